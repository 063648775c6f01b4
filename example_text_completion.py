"""Complete text prompts with a Llama 2, Code Llama or Llama 3 checkpoint, in Meta's layout or a Hugging Face folder.

python example_text_completion.py                      # the small model that ships in checkpoints/
torchrun --nproc_per_node 2 example_text_completion.py --ckpt_dir llama-2-13b/ --tokenizer_path tokenizer.model
python example_text_completion.py --ckpt_dir checkpoints/tiny-stdlib --prompts "import sys"
"""

import argparse
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import List, Optional

# OpenMP's waiting threads sleep instead of spinning (docs/performance.md): set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llama import Llama
from llama.cli import (
    EXAMPLE_FLAGS,
    add_flags,
    check_speculation_flags,
    compile_line,
    load_line,
    options_from,
    program_name,
    run_parser,
    text_or_list,
)
from llama.distributed import is_main_process, set_threads
from llama.options import EngineOptions, GenerationOptions, LoadOptions
from llama.tokenizer import resolve_tokenizer_path

BUNDLED = Path(__file__).resolve().parent / "checkpoints" / "tiny-stdlib"
BUNDLED_HELP = (
    "the checkpoint folder (Meta's layout or a Hugging Face folder); default: the bundled checkpoints/tiny-stdlib"
)

CODE_PROMPTS = [  # the bundled model was trained on Python source
    "import os\n",
    'def remove_non_ascii(s: str) -> str:\n    """',
    "class Stack:\n    def __init__(self):\n",
]
TEXT_PROMPTS = [  # Meta's prompts, for Meta's checkpoints
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description=(
            "Complete text prompts with a Llama checkpoint (Meta's layout or a Hugging Face folder) and print the "
            "completions. Without --ckpt_dir, the small model bundled in checkpoints/tiny-stdlib completes code."
        ),
    )
    max_gen_len = {"default": 64, "help": "the most tokens generated for each prompt"}
    add_flags(
        parser,
        *EXAMPLE_FLAGS,
        ckpt_dir={"help": BUNDLED_HELP},
        max_seq_len={"default": 128},
        max_batch_size={"default": 4},
        max_gen_len=max_gen_len,
    )
    parser.add_argument(
        "--prompts",
        type=text_or_list,
        default=None,
        help=(
            "one prompt, exactly as typed, or a Python list (\"['import os', 'def f(']\"); default: code prompts "
            "for the bundled model, else Meta's four"
        ),
    )
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    run_parser(parser(), complete, argv)


def complete(args: argparse.Namespace) -> None:
    """Complete the prompts of ``--prompts`` (or the default ones) and print them with their completions."""
    load = options_from(LoadOptions, args, ckpt_dir=args.ckpt_dir or str(BUNDLED), time_threads=args.threads is None)
    engine, generation = options_from(EngineOptions, args), options_from(GenerationOptions, args)
    prompts = args.prompts
    if prompts is None:
        prompts = CODE_PROMPTS if Path(load.ckpt_dir).resolve() == BUNDLED else TEXT_PROMPTS
    prompts = prompt_list(prompts)
    check_speculation_flags(generation.speculate, generation.speculate_k, load.draft_ckpt_dir)
    set_threads(args.threads)
    load = replace(load, tokenizer_path=resolve_tokenizer_path(load.ckpt_dir, load.tokenizer_path))

    start = time.perf_counter()
    generator = Llama.from_options(load, engine)
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    if args.verbose:  # the stream's text equals text_completion's, and the stream times its steps
        stream = generator.text_completion_stream(prompts, **asdict(generation))
        results = [{"generation": "".join(pieces)} for pieces in zip(*stream)]
        n_tokens = sum(len(tokens) for tokens in stream.tokens)
    else:
        results = generator.text_completion(prompts, **{**asdict(generation), "logprobs": True})
        n_tokens = sum(len(result["tokens"]) for result in results)
    seconds = time.perf_counter() - start

    if is_main_process():
        print(load_line(load.ckpt_dir, load.tokenizer_path, generator, load_seconds, load.quantize))
        for prompt, result in zip(prompts, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")
        print(f"Generated {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s)")
        if args.verbose:
            print(stream.timing())
        if (compiled := compile_line(generator.engine)) is not None:
            print(compiled)


def prompt_list(prompts: object) -> List[str]:
    """The prompts of --prompts (``text_or_list``): a string that is not a Python list is one prompt."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and all(isinstance(prompt, str) for prompt in prompts):
        return list(prompts)
    raise TypeError(
        "--prompts must be one prompt or a list of prompts, e.g. --prompts \"['import os', 'def f(']\", "
        f"got {prompts!r}"
    )


if __name__ == "__main__":
    main()
