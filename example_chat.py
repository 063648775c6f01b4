"""Chat with a Llama 2-Chat checkpoint in Meta's layout, in the Llama 2 chat format.

    python example_chat.py                                 # the small model that ships in checkpoints/
    torchrun --nproc_per_node 1 example_chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python example_chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model --interactive --system "Be brief."
"""

import os
import time
from pathlib import Path
from typing import List, Optional

from llama import Dialog, Llama
from llama.cli import check_speculation_flags, load_line, run
from llama.distributed import is_main_process, set_threads
from llama.tokenizer import resolve_tokenizer_path

BUNDLED = Path(__file__).resolve().parent / "checkpoints" / "tiny-stdlib"
REPLY_TOKENS = 256  # an interactive reply's default length: a few paragraphs, not the whole context
CHAT_COMMANDS = {  # what the interactive chat does with a line starting with "/", rather than send it
    "/help": "list these commands",
    "/reset": "start the conversation over (the system prompt stays)",
    "/exit": "quit (so do /quit and Ctrl-D; Ctrl-C stops a reply)",
}

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
    quantize: Optional[str] = None,
    compile: bool = False,
    speculate: Optional[str] = None,
    speculate_k: int = 4,
    draft_ckpt_dir: Optional[str] = None,
    draft_quantize: Optional[str] = None,
    kv_cache_tokens: Optional[int] = None,
    no_prefix_cache: bool = False,
    interactive: bool = False,
    system: Optional[str] = None,
    verbose: bool = False,
    threads: Optional[int] = None,
):
    """Answer Meta's four example dialogs in the Llama 2 chat format, or chat in the terminal
    (--interactive). Without --ckpt_dir, the small bundled model (trained on code, not on chat) shows
    the mechanics, not good answers.

    Args:
        ckpt_dir: the chat checkpoint folder (Meta's layout or a Hugging Face folder); default: the bundled checkpoints/tiny-stdlib
        max_gen_len: the most tokens of each reply; default: the rest of the context for the example dialogs, as in Meta's example, 256 in --interactive
        interactive: chat in the terminal; the reply streams in, the conversation is kept, /help lists the commands
        system: the system prompt of an --interactive chat
    The other flags are described in llama.cli.FLAG_HELP.
    """
    set_threads(threads)
    ckpt_dir = str(BUNDLED) if ckpt_dir is None else ckpt_dir
    tokenizer_path = resolve_tokenizer_path(ckpt_dir, tokenizer_path)
    if system is not None and not interactive:
        raise ValueError("--system is the system prompt of an --interactive chat; the example dialogs bring their own")
    if interactive and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--interactive reads the terminal in a single process; run it with python, not torchrun")

    check_speculation_flags(speculate, speculate_k, draft_ckpt_dir)

    start = time.perf_counter()
    generator = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype, quantize=quantize, compile=compile,
        draft_ckpt_dir=draft_ckpt_dir, draft_quantize=draft_quantize, kv_cache_tokens=kv_cache_tokens, prefix_cache=not no_prefix_cache,
    )
    speculation = dict(speculate=speculate, speculate_k=speculate_k)
    load_seconds = time.perf_counter() - start
    if interactive:
        print(load_line(ckpt_dir, tokenizer_path, generator, load_seconds, quantize))
        chat(generator, system, temperature, top_p, REPLY_TOKENS if max_gen_len is None else max_gen_len, verbose, **speculation)
        return

    start = time.perf_counter()
    if verbose:
        stream = generator.chat_completion_stream(DIALOGS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, **speculation)
        results = [{"generation": {"role": "assistant", "content": "".join(pieces)}} for pieces in zip(*stream)]
        n_tokens = sum(len(tokens) for tokens in stream.tokens)
    else:
        results = generator.chat_completion(DIALOGS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=True, **speculation)
        n_tokens = sum(len(result["tokens"]) for result in results)
    seconds = time.perf_counter() - start

    if is_main_process():
        print(load_line(ckpt_dir, tokenizer_path, generator, load_seconds, quantize))
        for dialog, result in zip(DIALOGS, results):
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")
        print(f"Generated {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s)")
        if verbose:
            print(stream.timing())
        if generator.engine.compile_seconds is not None:
            print(f"Compiled the decode step in {generator.engine.compile_seconds:.1f} s (on first use, counted above)")


def chat(generator: Llama, system: Optional[str], temperature: float, top_p: float, max_gen_len: int, verbose: bool, **options):
    """A terminal chat that keeps the dialog and streams each reply of at most ``max_gen_len``
    tokens (``options``: more generation options, e.g. speculate). When the dialog outgrows max_seq_len, its oldest exchanges are dropped (the system
    prompt stays)."""
    max_seq_len = generator.model.params.max_seq_len
    opening: Dialog = [{"role": "system", "content": system}] if system else []
    dialog: Dialog = list(opening)
    print("Type a message. /help lists the commands, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
    while True:
        try:
            line = input("\nYou: ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            dialog = list(opening)
            print("(conversation cleared)")
            continue
        if line == "/help":
            print("\n".join(f"  {name:<8}{description}" for name, description in CHAT_COMMANDS.items()))
            print("  A message that starts with / is sent when it starts with //, without the first /.")
            continue
        if line.startswith("//"):
            line = line[1:]
        elif line.startswith("/"):
            print(f"(unknown command {line.split()[0]}, not sent; /help lists the commands)")
            continue
        if not line:
            continue
        dialog.append({"role": "user", "content": line})
        n_prompt = fit_context(generator, dialog, len(opening), max_seq_len)
        if n_prompt >= max_seq_len:
            dialog.pop()
            print(f"(that message makes a {n_prompt}-token prompt, more than max_seq_len={max_seq_len} allows; write less or restart with a larger --max_seq_len)")
            continue
        room = max_seq_len - n_prompt
        stream = generator.chat_completion_stream([dialog], temperature, top_p, min(room, max_gen_len), **options)
        print("Assistant: ", end="", flush=True)
        reply = ""
        try:
            for (piece,) in stream:
                print(piece, end="", flush=True)
                reply += piece
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        dialog.append({"role": "assistant", "content": reply})
        n_reply = len(stream.tokens[0])
        if n_reply >= room:
            print(f"(the reply filled the {max_seq_len}-token context)")
        elif n_reply >= max_gen_len:
            print(f"(the reply reached --max_gen_len={max_gen_len} tokens; restart with a larger one for longer replies)")
        if verbose:
            print(f"({stream.timing()})")


def fit_context(generator: Llama, dialog: Dialog, n_kept: int, max_seq_len: int) -> int:
    """Drop the oldest (user, assistant) exchanges after the first ``n_kept`` messages until the
    prompt leaves a quarter of max_seq_len for the reply, or only the last message is left.
    Returns the prompt's length in tokens."""
    n_prompt = len(generator.encode_dialog(dialog))
    dropped = 0
    while n_prompt > max_seq_len * 3 // 4 and len(dialog) > n_kept + 1:
        del dialog[n_kept : n_kept + 2]
        dropped += 1
        n_prompt = len(generator.encode_dialog(dialog))
    if dropped:
        print(f"(context full: dropped the {dropped} oldest exchange(s))")
    return n_prompt


if __name__ == "__main__":
    run(main)
