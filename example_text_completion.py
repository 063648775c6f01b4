"""Complete text prompts with a Llama 2, Code Llama or Llama 3 checkpoint, in Meta's layout or a Hugging Face folder.

    python example_text_completion.py                      # the small model that ships in checkpoints/
    torchrun --nproc_per_node 2 example_text_completion.py --ckpt_dir llama-2-13b/ --tokenizer_path tokenizer.model
    python example_text_completion.py --ckpt_dir checkpoints/tiny-stdlib --prompts "import sys"
"""

import os
import time
from pathlib import Path
from typing import List, Optional, Union

# OpenMP's waiting threads sleep instead of spinning (docs/performance.md): set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llama import Llama
from llama.cli import check_speculation_flags, compile_line, load_line, run
from llama.distributed import is_main_process, set_threads
from llama.tokenizer import resolve_tokenizer_path

BUNDLED = Path(__file__).resolve().parent / "checkpoints" / "tiny-stdlib"

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


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    speculate: Optional[str] = None,
    speculate_k: int = 4,
    draft_ckpt_dir: Optional[str] = None,
    draft_quantize: Optional[str] = None,
    adapter_dir: Optional[str] = None,
    kv_cache_tokens: Optional[int] = None,
    no_prefix_cache: bool = False,
    prompts: Union[str, List[str], None] = None,
    verbose: bool = False,
    threads: Optional[int] = None,
):
    """Complete text prompts with a Llama checkpoint (Meta's layout or a Hugging Face folder) and print
    the completions. Without --ckpt_dir, the small model bundled in checkpoints/tiny-stdlib completes code.

    Args:
        ckpt_dir: the checkpoint folder (Meta's layout or a Hugging Face folder); default: the bundled checkpoints/tiny-stdlib
        max_gen_len: the most tokens generated for each prompt
        prompts: one prompt, exactly as typed, or a Python list ("['import os', 'def f(']"); default: code prompts for the bundled model, else Meta's four
    The other flags are described in llama.cli.FLAG_HELP.
    """
    set_threads(threads)
    ckpt_dir = str(BUNDLED) if ckpt_dir is None else ckpt_dir
    tokenizer_path = resolve_tokenizer_path(ckpt_dir, tokenizer_path)
    if prompts is None:
        prompts = CODE_PROMPTS if Path(ckpt_dir).resolve() == BUNDLED else TEXT_PROMPTS
    prompts = prompt_list(prompts)

    check_speculation_flags(speculate, speculate_k, draft_ckpt_dir)

    start = time.perf_counter()
    generator = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype, quantize=quantize, compile=compile,
        draft_ckpt_dir=draft_ckpt_dir, draft_quantize=draft_quantize, adapter_dir=adapter_dir,
        kv_cache_tokens=kv_cache_tokens, prefix_cache=not no_prefix_cache, time_threads=threads is None,
    )
    speculation = dict(speculate=speculate, speculate_k=speculate_k)
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    if verbose:  # the stream's text equals text_completion's, and the stream times its steps
        stream = generator.text_completion_stream(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, **speculation)
        results = [{"generation": "".join(pieces)} for pieces in zip(*stream)]
        n_tokens = sum(len(tokens) for tokens in stream.tokens)
    else:
        results = generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, logprobs=True, **speculation)
        n_tokens = sum(len(result["tokens"]) for result in results)
    seconds = time.perf_counter() - start

    if is_main_process():
        print(load_line(ckpt_dir, tokenizer_path, generator, load_seconds, quantize))
        for prompt, result in zip(prompts, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")
        print(f"Generated {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s)")
        if verbose:
            print(stream.timing())
        if (compiled := compile_line(generator.engine)) is not None:
            print(compiled)


def prompt_list(prompts: object) -> List[str]:
    """The prompts fire parsed from --prompts: a string that is not a Python list is one prompt."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and all(isinstance(prompt, str) for prompt in prompts):
        return list(prompts)
    raise TypeError(f"--prompts must be one prompt or a list of prompts, e.g. --prompts \"['import os', 'def f(']\", got {prompts!r}")


if __name__ == "__main__":
    run(main)
