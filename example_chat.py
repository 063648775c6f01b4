"""Chat with a Llama 2-Chat checkpoint in Meta's layout, in the Llama 2 chat format.

    python example_chat.py                                 # the small model that ships in checkpoints/
    torchrun --nproc_per_node 1 example_chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
"""

import time
from pathlib import Path
from typing import List, Optional

import fire

from llama import Dialog, Llama
from llama.distributed import is_main_process

BUNDLED = Path(__file__).resolve().parent / "checkpoints" / "tiny-stdlib"

DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {
            "role": "assistant",
            "content": "Paris, the capital of France, is known for its stunning architecture, art museums, "
            "historical landmarks, and romantic atmosphere.",
        },
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ],
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
):
    """Without --ckpt_dir, runs the small bundled model (trained on code, not on chat: it shows the
    mechanics, not good answers)."""
    if ckpt_dir is None:
        ckpt_dir = str(BUNDLED)
        tokenizer_path = tokenizer_path or str(BUNDLED / "tokenizer.model")
    if tokenizer_path is None:
        raise ValueError("--tokenizer_path is required with --ckpt_dir (the checkpoint's tokenizer.model)")

    start = time.perf_counter()
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    results = generator.chat_completion(DIALOGS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=True)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(result["tokens"]) for result in results)

    if is_main_process():
        print(f"Loaded {ckpt_dir} on {generator.device} ({generator.model.output.weight.dtype}) in {load_seconds:.2f} s")
        for dialog, result in zip(DIALOGS, results):
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")
        print(f"Generated {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s)")


if __name__ == "__main__":
    fire.Fire(main)
