"""Chat with a Llama 2-Chat or Llama 3 Instruct checkpoint (Meta's layout or a Hugging Face folder) in its chat format.

python example_chat.py                                 # the small model that ships in checkpoints/
torchrun --nproc_per_node 1 example_chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
python example_chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model --interactive --system "Be brief."
"""

import argparse
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import List, Optional, Tuple

# OpenMP's waiting threads sleep instead of spinning (docs/performance.md): set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llama import Dialog, Llama
from llama.cli import (
    EXAMPLE_FLAGS,
    add_flags,
    check_speculation_flags,
    compile_line,
    load_line,
    options_from,
    program_name,
    run_parser,
)
from llama.distributed import is_main_process, set_threads
from llama.options import EngineOptions, GenerationOptions, LoadOptions
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


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description=(
            "Answer Meta's four example dialogs in the Llama 2 chat format, or chat in the terminal (--interactive). "
            "Without --ckpt_dir, the small bundled model (trained on code, not on chat) shows the mechanics, not good "
            "answers."
        ),
    )
    add_flags(
        parser,
        *EXAMPLE_FLAGS,
        max_seq_len={"default": 512},
        max_batch_size={"default": 4},
        ckpt_dir={
            "help": (
                "the chat checkpoint folder (Meta's layout or a Hugging Face folder); default: the bundled "
                "checkpoints/tiny-stdlib"
            )
        },
        max_gen_len={
            "help": (
                "the most tokens of each reply; default: the rest of the context for the example dialogs, as in "
                f"Meta's example, {REPLY_TOKENS} in --interactive"
            )
        },
    )
    parser.add_argument(
        "--interactive",
        action="store_true",
        help=("chat in the terminal; the reply streams in, the conversation is kept, /help lists the commands"),
    )
    parser.add_argument("--system", default=None, help="the system prompt of an --interactive chat")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    run_parser(parser(), answer, argv)


def answer(args: argparse.Namespace) -> None:
    """Answer the example dialogs and print them with their answers, or chat (``--interactive``)."""
    load = options_from(LoadOptions, args, ckpt_dir=args.ckpt_dir or str(BUNDLED), time_threads=args.threads is None)
    engine, generation = options_from(EngineOptions, args), options_from(GenerationOptions, args)
    if args.system is not None and not args.interactive:
        raise ValueError("--system is the system prompt of an --interactive chat; the example dialogs bring their own")
    if args.interactive and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--interactive reads the terminal in a single process; run it with python, not torchrun")
    check_speculation_flags(generation.speculate, generation.speculate_k, load.draft_ckpt_dir)
    set_threads(args.threads)
    load = replace(load, tokenizer_path=resolve_tokenizer_path(load.ckpt_dir, load.tokenizer_path))

    start = time.perf_counter()
    generator = Llama.from_options(load, engine)
    load_seconds = time.perf_counter() - start
    if args.interactive:
        print(load_line(load.ckpt_dir, load.tokenizer_path, generator, load_seconds, load.quantize))
        if generation.max_gen_len is None:
            generation = replace(generation, max_gen_len=REPLY_TOKENS)
        chat(generator, args.system, generation, args.verbose)
        return

    start = time.perf_counter()
    if args.verbose:
        stream = generator.chat_completion_stream(DIALOGS, **asdict(generation))
        results = [{"generation": {"role": "assistant", "content": "".join(pieces)}} for pieces in zip(*stream)]
        n_tokens = sum(len(tokens) for tokens in stream.tokens)
    else:
        results = generator.chat_completion(DIALOGS, **{**asdict(generation), "logprobs": True})
        n_tokens = sum(len(result["tokens"]) for result in results)
    seconds = time.perf_counter() - start

    if is_main_process():
        print(load_line(load.ckpt_dir, load.tokenizer_path, generator, load_seconds, load.quantize))
        for dialog, result in zip(DIALOGS, results):
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")
        print(f"Generated {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s)")
        if args.verbose:
            print(stream.timing())
        if (compiled := compile_line(generator.engine)) is not None:
            print(compiled)


def chat(generator: Llama, system: Optional[str], generation: GenerationOptions, verbose: bool):
    """A terminal chat that keeps the dialog and streams each reply, of at most ``generation.max_gen_len``
    tokens. When the dialog outgrows max_seq_len, its oldest exchanges are dropped (the system
    prompt stays) for a message that is then answered; a message too long for the context even alone
    is refused and leaves the dialog as it was."""
    max_seq_len, max_gen_len = generator.engine.options.max_seq_len, generation.max_gen_len
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
        asked, n_prompt, n_dropped = fit_context(
            generator, dialog + [{"role": "user", "content": line}], len(opening), max_seq_len
        )
        if n_prompt >= max_seq_len:  # refused: the conversation stays as it was
            print(
                f"(that message makes a {n_prompt}-token prompt, more than max_seq_len={max_seq_len} allows; "
                "write less or restart with a larger --max_seq_len)"
            )
            continue
        if n_dropped:
            print(f"(context full: dropped the {n_dropped} oldest exchange(s))")
        dialog = asked
        room = max_seq_len - n_prompt
        reply_options = {**asdict(generation), "max_gen_len": min(room, max_gen_len)}
        stream = generator.chat_completion_stream([dialog], **reply_options)
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
            print(
                f"(the reply reached --max_gen_len={max_gen_len} tokens; restart with a larger one for longer replies)"
            )
        if verbose:
            print(f"({stream.timing()})")


def fit_context(generator: Llama, dialog: Dialog, n_kept: int, max_seq_len: int) -> Tuple[Dialog, int, int]:
    """``dialog`` without its oldest (user, assistant) exchanges after the first ``n_kept`` messages,
    as many as the prompt must lose to leave a quarter of max_seq_len for the reply (or all but the
    last message); ``dialog`` itself is unchanged.

    Returns:
        (the dialog kept, its prompt's length in tokens, the number of exchanges dropped).
    """
    kept = list(dialog)
    n_prompt = len(generator.encode_dialog(kept))
    n_dropped = 0
    while n_prompt > max_seq_len * 3 // 4 and len(kept) > n_kept + 1:
        del kept[n_kept : n_kept + 2]
        n_dropped += 1
        n_prompt = len(generator.encode_dialog(kept))
    return kept, n_prompt, n_dropped


if __name__ == "__main__":
    main()
