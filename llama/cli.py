"""How every command of this repository starts and fails: its flags, declared once, parsed by argparse and
checked before anything loads, and a user error printed as one line, once per job, with exit status 2.

    parser = argparse.ArgumentParser(prog="python -m llama.x", description="...")
    add_flags(parser, "ckpt_dir", "max_seq_len", max_seq_len={"default": 128})  # the flags declared in llama.options
    parser.add_argument("--out", ...)                                           # the command's own
    run_parser(parser, command, argv)                                           # command(parsed namespace)

A flag shared by commands is a field of ``LoadOptions``, ``EngineOptions`` or ``GenerationOptions``
(``llama.options.flag``: its help in the field's metadata, its default the field's) or an entry of
``COMMAND_FLAGS``; a command gives each its own default or help where it differs, and turns the parsed
flags back into the options (``options_from``). Flags may be written with hyphens (``--max-seq-len``) and
as ``--flag=value``; an unknown flag is named with the likely intended one and every known flag.

A user error is an exception of ``USER_ERRORS``: a bad flag value, a missing file, a rank that failed
(``RankFailedError`` names it). It prints ``error: <message>`` on stderr, on rank 0 only under
torchrun (every rank of a job checks the same arguments and ``fail_together`` gives every rank the
failure of one), and every rank exits with status 2, so torchrun ends the job instead of waiting.
Ctrl-C prints ``interrupted (Ctrl-C)`` once and exits with status 130. Any other exception is a bug
and keeps its traceback. ``--traceback`` (accepted by every command) or ``LLAMA_TRACEBACK=1`` shows
the traceback of user errors and Ctrl-C too.
"""

import argparse
import ast
import contextlib
import dataclasses
import difflib
import os
import re
import sys
import typing
from typing import Callable, Iterator, List, NoReturn, Optional, Sequence, Tuple, Union

import torch

from llama.distributed import RankFailedError, launched_as_rank0
from llama.options import EngineOptions, GenerationOptions, LoadOptions

USER_ERRORS = (ValueError, TypeError, OSError, RankFailedError)
OPTION_FLAGS = {  # the options' fields that commands take as flags (llama.options.flag)
    field.name: field
    for options in (LoadOptions, EngineOptions, GenerationOptions)
    for field in dataclasses.fields(options)
    if "help" in field.metadata
}
COMMAND_FLAGS = {  # the flags several commands share that are no option of loading, the engine or a generation
    "threads": dict(
        type=int,
        default=None,
        help=(
            "CPU threads torch computes with; default: OMP_NUM_THREADS if set (1 per process under torchrun), "
            "else one per core or fewer, whichever decodes the loaded model fastest, timed at load "
            "(a model over 1 GiB keeps one per core)"
        ),
    ),
    "verbose": dict(action="store_true", help="also print the prompt and decoding speeds"),
}
EXAMPLE_FLAGS = (  # the flags both example scripts take: Meta's seven first, in Meta's order
    "ckpt_dir",
    "tokenizer_path",
    "temperature",
    "top_p",
    "max_seq_len",
    "max_gen_len",
    "max_batch_size",
    "device",
    "dtype",
    "quantize",
    "compile",
    "speculate",
    "speculate_k",
    "draft_ckpt_dir",
    "draft_quantize",
    "adapter_dir",
    "kv_cache_tokens",
    "kv_cache_dtype",
    "prefix_cache",
    "verbose",
    "threads",
)
TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "LLAMA_TRACEBACK"
EXIT_USER_ERROR = 2  # the status argparse uses for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def run_parser(
    parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], None], argv: Optional[Sequence[str]] = None
) -> None:
    """Run a command: ``main(parser.parse_args(argv))``, its errors, the parser's own included (an unknown
    flag, a missing one, a value of the wrong type), printed as one line, once per job.

    Args:
        parser: the command's flags; ``--traceback`` is added to them, and a flag is its whole name (no
            abbreviations: ``--temp`` is not ``--temperature``).
        main: the command, given the parsed flags.
        argv: the arguments after the program name; None reads ``sys.argv``.
    """
    argv, show_traceback = split_traceback_flag(sys.argv[1:] if argv is None else argv)
    with user_errors_exit(show_traceback):
        parser.error = fail  # argparse reports a bad command line through error(message)
        parser.formatter_class = HelpFormatter
        parser.allow_abbrev = False
        add_traceback_flag(parser)
        args, unknown = parser.parse_known_args(underscored(argv))
        if unknown:
            raise ValueError(unknown_arguments(parser, unknown))
        main(args)


def declared_flag(name: str) -> Tuple[str, dict]:
    """The flag ``name`` as declared (an options' field or ``COMMAND_FLAGS``): how it is written and
    ``add_argument``'s keywords. A boolean field is a switch: ``--compile`` sets it; a field True by default
    is turned off by its flag (``--no_prefix_cache``)."""
    if name in COMMAND_FLAGS:
        return f"--{name}", dict(COMMAND_FLAGS[name], dest=name)
    field = OPTION_FLAGS[name]
    flag = field.metadata["flag"] or f"--{name}"
    default = None if field.default is dataclasses.MISSING else field.default
    if field.type is bool:
        return flag, dict(dest=flag.lstrip("-"), action="store_true", default=False, help=field.metadata["help"])
    kinds = typing.get_args(field.type) or (field.type,)
    kind = next(kind for kind in kinds if kind in (int, float, str))
    return flag, dict(dest=name, type=kind, default=default, help=field.metadata["help"])


def add_flags(parser: argparse.ArgumentParser, *names: str, **changes: dict) -> None:
    """Add the flags ``names`` to ``parser``, in that order, as declared (``declared_flag``).

    Args:
        names: fields of the options (``OPTION_FLAGS``) or ``COMMAND_FLAGS``.
        changes: a command's own ``add_argument`` keywords for some of them, e.g.
            ``max_seq_len={"default": 128}``, ``ckpt_dir={"required": True}``.
    """
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise TypeError(f"add_flags: changes to flags not added: {unknown}")
    for name in names:
        flag, keywords = declared_flag(name)
        parser.add_argument(flag, **{**keywords, **changes.get(name, {})})


def options_from(options: type, args: argparse.Namespace, **given):
    """An ``options`` (``LoadOptions``, ``EngineOptions``, ``GenerationOptions``) of the flags in ``args``
    declared by its fields, and ``given``; checked as it is made."""
    values = {}
    for field in dataclasses.fields(options):
        flag = field.metadata.get("flag") or f"--{field.name}"
        if "help" in field.metadata and field.name not in given and hasattr(args, flag.lstrip("-")):
            value = getattr(args, flag.lstrip("-"))
            values[field.name] = not value if flag != f"--{field.name}" else value  # --no_prefix_cache: prefix_cache
    return options(**values, **given)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, with each flag's default after its description (a flag whose default is None
    says in its description what it defaults to)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.option_strings and not action.required and action.default not in (None, argparse.SUPPRESS):
            return f"{action.help or ''} (default: %(default)s)"
        return action.help or ""


def add_traceback_flag(parser: argparse.ArgumentParser) -> None:
    """``--traceback`` in the help; ``split_traceback_flag`` takes it out of the arguments before parsing."""
    parser.add_argument(
        TRACEBACK_FLAG,
        action="store_true",
        help=(f"show the full traceback of an error instead of one line; {TRACEBACK_ENV}=1 does the same"),
    )


def underscored(argv: Sequence[str]) -> List[str]:
    """The arguments with each flag's name written with underscores: ``--max-seq-len 8`` is
    ``--max_seq_len 8``. A lone ``--`` ends the flags."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    for index, argument in enumerate(argv[:end]):
        if re.match(r"^--[A-Za-z][\w-]*(=|$)", argument):
            name, equals, value = argument.partition("=")
            argv[index] = "--" + name[2:].replace("-", "_") + equals + value
    return argv


def unknown_arguments(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """What is wrong with the arguments ``parser`` did not recognise: the first unknown flag, with the
    likely intended one and every known flag; else argparse's own words for stray values."""
    flag = next((argument.split("=", 1)[0] for argument in unknown if re.match(r"^--?[A-Za-z]", argument)), None)
    if flag is None:
        return f"unrecognized arguments: {' '.join(unknown)}"
    known = [
        option
        for action in parser._actions
        if action.dest not in ("help", "traceback")
        for option in action.option_strings
    ]
    close = [option for option in known if option.startswith(flag)] or difflib.get_close_matches(flag, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown flag {flag}{hint}; known flags: {', '.join(known)}"


def text_or_list(text: str) -> Union[str, list]:
    """``text`` itself, unless it is a Python list or tuple literal: then that list (``--prompts``)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return list(value) if isinstance(value, (list, tuple)) else text


def check_speculation_flags(speculate: Optional[str], speculate_k: int, draft_ckpt_dir: Optional[str]) -> None:
    """The speculation flags, before anything loads: valid values, and a draft only with
    ``--speculate draft`` (a draft loaded for nothing would be a flag silently ignored)."""
    GenerationOptions(speculate=speculate, speculate_k=speculate_k).check_draft(draft_ckpt_dir is not None)
    if draft_ckpt_dir is not None and speculate != "draft":
        raise ValueError(f"--draft_ckpt_dir is used by --speculate draft only, got --speculate {speculate}")


def split_traceback_flag(argv: Sequence[str]) -> Tuple[List[str], bool]:
    """The arguments without ``--traceback``, and whether the traceback of a user error is shown."""
    argv = list(argv)
    shown = TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    return [a for a in argv if a != TRACEBACK_FLAG], shown


@contextlib.contextmanager
def user_errors_exit(show_traceback: bool) -> Iterator[None]:
    """Turn a user error raised in the block into ``fail(message)``, and Ctrl-C into one line and exit
    status 130 (a shell's for a command ended by SIGINT); re-raise either if ``show_traceback``."""
    try:
        yield
    except USER_ERRORS as error:
        if show_traceback:
            raise
        fail(str(error))
    except KeyboardInterrupt:
        if show_traceback:
            raise
        say_once("interrupted (Ctrl-C)")
        sys.exit(EXIT_INTERRUPTED)


def say_once(line: str) -> None:
    """Print ``line`` on stderr, on rank 0 only under torchrun."""
    if launched_as_rank0():
        print(line, file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr (rank 0 only under torchrun) and exit with status 2."""
    say_once(f"error: {message}")
    sys.exit(EXIT_USER_ERROR)


def load_line(ckpt_dir: str, tokenizer_path: str, generator, seconds: float, quantize: Optional[str] = None) -> str:
    """What a command says once it has loaded a checkpoint: which files, where, in which dtype. A merged
    adapter, quantized weights and a KV cache in another dtype than the model's (with the pool's bytes) are
    named only when there are some, so that a plain model's line stays ``... (torch.float32) in 0.10 s``.

    Args:
        ckpt_dir: the checkpoint folder, as given.
        tokenizer_path: the tokenizer file used (given, or found by ``resolve_tokenizer_path``).
        generator: the loaded ``Llama``; its ``adapter_dir`` and ``kv_cache_dtype`` are named too.
        seconds: how long loading took.
        quantize: the ``--quantize`` value; the line then names the activations' dtype and the weights'.

    Returns:
        e.g. ``Loaded llama-2-7b/ with the adapter run/ (tokenizer: tokenizer.model) on cpu with 2 thread(s)
        (torch.bfloat16 activations, int4 weights, torch.float32 KV cache of 512.0 MiB) in 9.12 s``.
    """
    dtype = f"{generator.dtype} activations, {quantize} weights" if quantize else str(generator.dtype)
    if generator.kv_cache_dtype != generator.dtype:
        dtype += f", {generator.kv_cache_dtype} KV cache of {generator.engine.kv_cache_bytes / 2**20:.1f} MiB"
    adapter = f" with the adapter {generator.adapter_dir}" if generator.adapter_dir is not None else ""
    device = (
        f"cpu with {torch.get_num_threads()} thread(s)" if generator.device.type == "cpu" else str(generator.device)
    )
    return f"Loaded {ckpt_dir}{adapter} (tokenizer: {tokenizer_path}) on {device} ({dtype}) in {seconds:.2f} s"


def compile_line(engine) -> Optional[str]:
    """What a command says after generating with ``--compile``: how long each compiled step took on
    first use, compilation included (the decode step; with ``--speculate`` the verification pass and
    the draft's step); None when nothing was compiled.

    Args:
        engine: the ``llama.engine.Engine`` that generated.
    """
    compiled = [f"{name} in {seconds:.1f} s" for name, seconds in engine.compile_times() if seconds is not None]
    return f"Compiled {', '.join(compiled)} (on first use, counted above)" if compiled else None


def program_name() -> str:
    """How the command was started: ``python -m llama.server`` or ``python example_chat.py``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return f"python {os.path.basename(sys.argv[0])}" if sys.argv and sys.argv[0] else "llama"
