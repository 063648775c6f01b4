"""Structured output: the two grammar libraries side by side on this project's vocabularies, and what a
grammar costs the engine's decoding.

    python bench/structured.py                                       # the bundled model's vocabulary
    python bench/structured.py --tokenizer_path llama-3/tokenizer.model   # and Llama 3's 128,256 tokens

Sections (alternating rounds, medians printed):

- libraries: llguidance (the project's) against xgrammar, per vocabulary: building the vocabulary
  once, a schema's grammar (xgrammar compiles it ahead; llguidance builds a matcher), and the masks
  of 8 rows per step along a seeded walk of allowed tokens; and whether each refuses what it cannot
  express (a schema with ``not``) rather than ignoring it.
- decode: the bundled model's tokens/s with 8 rows decoding freely against 8 rows under a JSON
  Schema (an array of 240 digits: every row decodes the whole budget either way), in one engine.

The load average is printed: the machine may be shared.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama import Llama  # noqa: E402  (after the path: the repository's llama)
from llama.checkpoints.files import BUNDLED  # noqa: E402
from llama.engine.structured import COMPACT, special_ids  # noqa: E402
from llama.options import GenerationOptions  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
UNSUPPORTED = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
DIGITS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 240}
ROWS = 8


def vocabulary(tokenizer: Tokenizer):
    specials = set(special_ids(tokenizer))
    return [b"" if i in specials else tokenizer.token_bytes(i) for i in range(tokenizer.n_words)], sorted(specials)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, tokens, specials):
        import llguidance
        import llguidance.torch

        from llama.engine.structured import TokenizerFunctions

        self.lib, self.torch = llguidance, llguidance.torch
        wrapper = llguidance.TokenizerWrapper(TokenizerFunctions(tokenizer, tokens, specials))
        self.lltokenizer = llguidance.LLTokenizer(wrapper, n_vocab=len(tokens), eos_token=list(tokenizer.stop_tokens))
        self.n = len(tokens)

    def grammar(self, schema):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT)
        matcher = self.lib.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matchers(self, grammar):
        return [grammar.deep_copy() for _ in range(ROWS)]

    def fill(self, matchers, bitmask):
        for i, matcher in enumerate(matchers):
            self.torch.fill_next_token_bitmask(matcher, bitmask, i)

    def bitmask(self):
        return self.torch.allocate_token_bitmask(ROWS, self.n)

    def accept(self, matcher, token):
        matcher.consume_token(token)
        if matcher.is_stopped():  # a finished row starts again: every step measures 8 masks
            matcher.reset()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, tokens, specials):
        import xgrammar

        self.lib = xgrammar
        info = xgrammar.TokenizerInfo(
            tokens, xgrammar.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=list(tokenizer.stop_tokens)
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.n = len(tokens)

    def grammar(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matchers(self, grammar):
        return [self.lib.GrammarMatcher(grammar) for _ in range(ROWS)]

    def fill(self, matchers, bitmask):
        for i, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, i)

    def bitmask(self):
        return self.lib.allocate_token_bitmask(ROWS, self.n)

    def accept(self, matcher, token):
        matcher.accept_token(token)
        if matcher.is_terminated():
            matcher.reset()


def walk_seconds(library, grammar, steps: int, seed: int) -> float:
    """Median seconds of one step's 8 masks along a seeded walk of allowed tokens."""
    matchers, bitmask, rng, times = library.matchers(grammar), library.bitmask(), random.Random(seed), []
    bits = torch.arange(32, dtype=torch.int32)
    for _ in range(steps):
        start = time.perf_counter()
        library.fill(matchers, bitmask)
        times.append(time.perf_counter() - start)
        allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, : library.n]
        for i, matcher in enumerate(matchers):
            library.accept(matcher, rng.choice(allowed[i].nonzero()[:, 0].tolist()))
    return statistics.median(times)


def section_libraries(args) -> None:
    paths = [("bundled (sentencepiece, 4,096)", str(BUNDLED / "tokenizer.model"))]
    if args.tokenizer_path:
        paths.append((f"{args.tokenizer_path}", args.tokenizer_path))
    for label, path in paths:
        tokenizer = Tokenizer(path)
        tokens, specials = vocabulary(tokenizer)
        print(f"\n{label}: {len(tokens)} tokens   (load {os.getloadavg()[0]:.1f})")
        results = {name: {"vocabulary": [], "grammar": [], "masks": []} for name in ("llguidance", "xgrammar")}
        for i in range(args.rounds):
            for cls in (LLGuidance, XGrammar) if i % 2 == 0 else (XGrammar, LLGuidance):
                start = time.perf_counter()
                library = cls(tokenizer, tokens, specials)
                results[cls.name]["vocabulary"].append(time.perf_counter() - start)
                start = time.perf_counter()
                grammar = library.grammar(SCHEMA)
                results[cls.name]["grammar"].append(time.perf_counter() - start)
                results[cls.name]["masks"].append(walk_seconds(library, grammar, args.steps, i))
                try:
                    library.grammar(UNSUPPORTED)
                    results[cls.name]["refuses"] = "no: ignored"
                except (ValueError, RuntimeError) as error:
                    results[cls.name]["refuses"] = f"yes: {str(error).splitlines()[0][-60:]}"
        for name, result in results.items():
            print(
                f"  {name:10s} vocabulary {1e3 * statistics.median(result['vocabulary']):8.1f} ms   "
                f"grammar {1e3 * statistics.median(result['grammar']):7.2f} ms"
                f"   8-row masks per step {1e3 * statistics.median(result['masks']):6.3f} ms   "
                f"refuses 'not': {result['refuses']}"
            )


def section_decode(args) -> None:
    torch.set_num_threads(args.threads)
    llama = Llama.build(str(BUNDLED), str(BUNDLED / "tokenizer.model"), 512, ROWS, device="cpu", dtype="float32")
    prompts = llama.encode_prompts(["import os\n", "def main():\n", "class A:\n", "x = 1\n"] * 2)
    free = GenerationOptions(max_gen_len=args.tokens, temperature=0, stop_tokens=[])
    constrained = GenerationOptions(max_gen_len=args.tokens, temperature=0, stop_tokens=[], json_schema=DIGITS)
    rates = {"free": [], "constrained": []}
    llama.generate(prompts, max_gen_len=8, temperature=0)  # warm
    for i in range(args.rounds):
        for name, options in (
            (("free", free), ("constrained", constrained))
            if i % 2 == 0
            else (("constrained", constrained), ("free", free))
        ):
            start = time.perf_counter()
            request = llama.engine.submit(prompts, options)
            for _ in llama.engine.run_until_done(request):
                pass
            seconds = time.perf_counter() - start
            rates[name].append(sum(map(len, request.tokens)) / seconds)
    free_rate, constrained_rate = statistics.median(rates["free"]), statistics.median(rates["constrained"])
    print(
        f"\ndecode, bundled model, {ROWS} rows x {args.tokens} tokens, {args.threads} thread(s), "
        f"{args.rounds} rounds (load {os.getloadavg()[0]:.1f}):"
    )
    print(f"  free        {free_rate:8.0f} tok/s   {[round(r) for r in rates['free']]}")
    print(f"  constrained {constrained_rate:8.0f} tok/s   {[round(r) for r in rates['constrained']]}")
    print(f"  cost of the grammar: {100 * (1 - constrained_rate / free_rate):.1f}% of decode tokens/s")


SECTIONS = {"libraries": section_libraries, "decode": section_decode}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="libraries,decode", help=f"comma-separated, of {list(SECTIONS)}")
    parser.add_argument(
        "--tokenizer_path", default=None, help="another tokenizer (Llama 3's tokenizer.model) for the libraries section"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="mask steps per walk")
    parser.add_argument("--tokens", type=int, default=480, help="decode: tokens per row")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"{Path(__file__).name}: {os.popen('lscpu').read().split('Model name:')[1].splitlines()[0].strip()}")
    for name in args.sections.split(","):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
