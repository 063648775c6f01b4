"""The interactive chat, driven through a pseudo-terminal as a person drives it: typing lines,
Ctrl-C during a reply, Ctrl-D to quit."""

import codecs
import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SMALL_PARAMS, random_state
from llama.checkpoints.writers import save_checkpoint
from llama.generation import Llama
from llama.model import ModelArgs

ROOT = Path(__file__).resolve().parent.parent


class Terminal:
    """A program running in a pseudo-terminal: ``type`` into it, ``expect`` what it prints."""

    def __init__(self, args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its terminal is the pty, and Ctrl-C there interrupts it
            os.chdir(ROOT)
            os.execv(args[0], args)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.output = ""
        self.read_to = 0

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, text: str, timeout: float = 60) -> str:
        """What the program printed from the previous expect through ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.output[self.read_to :]:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {text!r} within {timeout} s; the terminal shows:\n{self.output}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the program exited
                data = b""
            if not data:
                raise AssertionError(f"the program ended before printing {text!r}; the terminal shows:\n{self.output}")
            self.output += self.decoder.decode(data).replace("\r\n", "\n")
        end = self.output.index(text, self.read_to) + len(text)
        seen, self.read_to = self.output[self.read_to : end], end
        return seen

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.read(self.fd, 4096)  # drain, so the program never blocks on a full terminal
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        raise AssertionError(f"the program did not exit; the terminal shows:\n{self.output}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def terminal():
    terminals = []

    def start(ckpt_dir, tokenizer_path, *options):
        args = [
            sys.executable,
            "example_chat.py",
            "--interactive",
            "--ckpt_dir",
            ckpt_dir,
            "--tokenizer_path",
            tokenizer_path,
            "--device",
            "cpu",
            *options,
        ]
        terminals.append(Terminal(args))
        return terminals[-1]

    yield start
    for t in terminals:
        t.close()


def reply(seen: str) -> str:
    """The assistant's reply in what the terminal showed from one "You: " prompt to the next, without
    the note that it reached --max_gen_len and the --verbose timing."""
    shown = seen.split("Assistant: ", 1)[1].rsplit("\n\nYou: ", 1)[0]
    shown = re.sub(r"\n\(prompt: .*\)$", "", shown)
    return re.sub(
        r"\n\(the reply reached --max_gen_len=\d+ tokens; restart with a larger one for longer replies\)$", "", shown
    )


def test_two_turn_conversation_and_reset(make_checkpoint, tokenizer_path, terminal):
    ckpt_dir, _ = make_checkpoint()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=256, max_batch_size=1, device="cpu", dtype="float32")

    def answer(*turns):
        dialog = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
        (result,) = llama.chat_completion([dialog], temperature=0, max_gen_len=12)
        return result["generation"]["content"].replace("\r\n", "\n")

    first = answer("hello there")
    second = answer("hello there", first, "and then?")

    chat = terminal(ckpt_dir, tokenizer_path, "--temperature", "0", "--max_gen_len", "12", "--max_seq_len", "256")
    chat.expect("You: ")
    chat.type("hello there\n")
    assert reply(chat.expect("\n\nYou: ")) == first
    chat.type("/help\n")
    assert "/reset  start the conversation over" in chat.expect("\n\nYou: ")
    chat.type("/hlep me\n")  # refused, not sent: the next answer is the same as without it
    assert "(unknown command /hlep, not sent; /help lists the commands)" in chat.expect("\n\nYou: ")
    chat.type("and then?\n")  # answered with the first exchange in the prompt
    assert reply(chat.expect("\n\nYou: ")) == second
    chat.type("/reset\n")
    chat.expect("(conversation cleared)\n\nYou: ")
    chat.type("hello there\n")  # a fresh dialog answers as the first time
    assert reply(chat.expect("\n\nYou: ")) == first
    chat.type("/quit\n")
    assert chat.exit_code() == 0


def test_ctrl_c_stops_a_reply_and_ctrl_d_quits(tmp_path, tokenizer_path, terminal):
    state = random_state(ModelArgs.from_dict({**SMALL_PARAMS, "vocab_size": 512}))
    state["output.weight"][2] = 0  # EOS's logit is 0, below the largest: greedy replies run to the context limit
    save_checkpoint(str(tmp_path), SMALL_PARAMS, state, n_shards=1, dtype=torch.bfloat16)

    chat = terminal(
        str(tmp_path), tokenizer_path, "--temperature", "0", "--max_seq_len", "4096", "--max_gen_len", "4000"
    )
    chat.expect("You: ")
    chat.type("tell me everything\n")
    chat.expect("Assistant: ")
    time.sleep(1)  # mid-reply: a reply to the context limit takes far longer
    chat.type("\x03")  # Ctrl-C, as the terminal sends it
    assert "[stopped]" in chat.expect("\n\nYou: ")
    chat.type("/reset\n")  # still running and listening
    chat.expect("(conversation cleared)\n\nYou: ")
    chat.type("\x04")  # Ctrl-D
    assert chat.exit_code() == 0


def test_context_limit_refuses_a_too_long_message_and_drops_old_exchanges(make_checkpoint, tokenizer_path, terminal):
    ckpt_dir, _ = make_checkpoint()
    chat = terminal(
        ckpt_dir,
        tokenizer_path,
        "--temperature",
        "0",
        "--max_gen_len",
        "6",
        "--max_seq_len",
        "48",
        "--system",
        "be brief",
    )
    chat.expect("You: ")
    chat.type("word " * 60 + "\n")
    assert "more than max_seq_len=48 allows" in chat.expect("\n\nYou: ")
    chat.type("hi\n")
    assert "dropped" not in chat.expect("\n\nYou: ")
    chat.type("hi again\n")
    assert "(context full: dropped the 1 oldest exchange(s))" in chat.expect("\n\nYou: ")
    chat.type("/exit\n")
    assert chat.exit_code() == 0


def test_a_refused_message_leaves_the_conversation_as_it_was(make_checkpoint, tokenizer_path, terminal):
    ckpt_dir, _ = make_checkpoint()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=96, max_batch_size=1, device="cpu", dtype="float32")
    first = llama.chat_completion([[{"role": "user", "content": "hi"}]], temperature=0, max_gen_len=6)[0]["generation"][
        "content"
    ]
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"},
    ]
    (second,) = llama.chat_completion([history], temperature=0, max_gen_len=6)

    chat = terminal(ckpt_dir, tokenizer_path, "--temperature", "0", "--max_gen_len", "6", "--max_seq_len", "96")
    chat.expect("You: ")
    chat.type("hi\n")
    assert reply(chat.expect("\n\nYou: ")) == first.replace("\r\n", "\n")
    chat.type("word " * 100 + "\n")
    refused = chat.expect("\n\nYou: ")
    assert "more than max_seq_len=96 allows" in refused and "dropped" not in refused
    chat.type("and then?\n")  # answered with the first exchange still in the prompt
    assert reply(chat.expect("\n\nYou: ")) == second["generation"]["content"].replace("\r\n", "\n")
    chat.type("/exit\n")
    assert chat.exit_code() == 0


def test_a_reply_stops_at_256_tokens_by_default_says_how_to_get_longer_ones_and_counts_alike(
    tmp_path, tokenizer_path, terminal
):
    state = random_state(ModelArgs.from_dict({**SMALL_PARAMS, "vocab_size": 512}))
    state["output.weight"][2] = 0  # EOS's logit is 0, below the largest: greedy replies never end by themselves
    save_checkpoint(str(tmp_path), SMALL_PARAMS, state, n_shards=1, dtype=torch.bfloat16)
    llama = Llama.build(str(tmp_path), tokenizer_path, max_seq_len=512, max_batch_size=1, device="cpu", dtype="float32")
    (expected,) = llama.chat_completion(
        [[{"role": "user", "content": "hello"}]], temperature=0, max_gen_len=256, logprobs=True
    )
    assert len(expected["tokens"]) == 256

    chat = terminal(
        str(tmp_path), tokenizer_path, "--temperature", "0", "--verbose"
    )  # default max_seq_len 512: room for more than 256
    chat.expect("You: ")
    chat.type("hello\n")
    seen = chat.expect("\n\nYou: ")
    assert reply(seen) == expected["generation"]["content"].replace("\r\n", "\n")
    assert "(the reply reached --max_gen_len=256 tokens; restart with a larger one for longer replies)" in seen
    assert "generated: 256 tokens, the first with the prompt, then decode: 255 tokens in " in seen
    chat.type("/exit\n")
    assert chat.exit_code() == 0
