"""How every command of this repository starts and fails: flags checked before anything loads, and a
user error printed as one line, once per job, with exit status 2.

    if __name__ == "__main__":
        run(main)                       # a function whose keyword arguments are the flags (fire)
        run_parser(parser, main)        # an argparse command: main(parsed_namespace)

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
import difflib
import inspect
import os
import re
import sys
import typing
from typing import Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple, Union

import fire
import torch

from llama.distributed import RankFailedError, launched_as_rank0
from llama.options import GenerationOptions

USER_ERRORS = (ValueError, TypeError, OSError, RankFailedError)
FLAG_HELP = {  # the flags several commands share, described once; a command's own docstring may say more
    "ckpt_dir": "the checkpoint folder: Meta's params.json + consolidated.NN.pth, or a Hugging Face folder",
    "tokenizer_path": "the tokenizer: a sentencepiece or tiktoken tokenizer.model, or a Hugging Face tokenizer.json; default: the one in the checkpoint folder, else beside it",
    "max_seq_len": "the context length in tokens: prompt and generation together",
    "max_batch_size": "the most rows (prompts, dialogs, samples) decoded together",
    "temperature": "sampling temperature; 0 is greedy",
    "top_p": "nucleus sampling: sample among the most probable tokens whose probabilities add up to top_p",
    "device": "cpu, cuda or mps; default: the GPU if there is one, else the CPU",
    "dtype": "float32, bfloat16 or float16; default: per device (float32 on CPU, bfloat16 there for quantized weights)",
    "quantize": "int8, int4, or int4-g32/-g64/-g128/-g256 weights; default: not quantized",
    "compile": "run the decode step under torch.compile (a CUDA graph on CUDA); the first generation compiles it",
    "verbose": "also print the prompt and decoding speeds",
    "speculate": "speculative decoding: lookup (n-grams of the prompt and output) or draft (needs --draft_ckpt_dir); same output, faster when proposals are accepted",
    "speculate_k": "tokens proposed and verified per step with --speculate",
    "draft_ckpt_dir": "a smaller checkpoint with the same vocabulary, for --speculate draft; --ckpt_dir itself with --draft_quantize for a quantized self-draft",
    "draft_quantize": "int8, int4, ... weights for the draft (as --quantize)",
    "adapter_dir": "a LoRA adapter in peft's format (adapter_config.json, adapter_model.safetensors, as python -m llama.finetune writes it), merged into the weights as they load",
    "kv_cache_tokens": "the KV cache pool's size in tokens, shared by the rows in blocks; default: max_batch_size x max_seq_len",
    "no_prefix_cache": "compute every prompt in full instead of reusing the cached blocks of a prefix an earlier request computed",
    "threads": "CPU threads torch computes with; default: OMP_NUM_THREADS if set (1 per process under torchrun), else one per core or fewer, whichever decodes the model fastest, timed at load",
}
TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "LLAMA_TRACEBACK"
EXIT_USER_ERROR = 2  # the status argparse and fire use for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def run(main: Callable, argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main`` as a command whose flags are its parameters, parsed by fire.

    Unknown flags are rejected before ``main`` is called: fire would call ``main`` with the flags it
    knows (loading the model, generating) and only then complain about the others.

    Args:
        main: the command; ``--name value`` sets parameter ``name``. A ``**kwargs`` parameter turns
            the flag check off.
        argv: the arguments after the program name; None reads ``sys.argv``.
    """
    argv, show_traceback = split_traceback_flag(sys.argv[1:] if argv is None else argv)
    with user_errors_exit(show_traceback):
        if any(name in ("help", "h") for _, name in flags(argv)):
            help_parser(main).print_help()
            return
        check_flags(main, argv)
        fire.decorators.SetParseFns(**text_parsers(main))(main)
        fire.Fire(main, command=argv, name=program_name())


def run_parser(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], None], argv: Optional[Sequence[str]] = None) -> None:
    """Run an argparse command with ``run``'s error behaviour: ``main(parser.parse_args(argv))``.

    The parser's own errors (an unknown flag, a missing one) are printed the same way, once per job.
    """
    argv, show_traceback = split_traceback_flag(sys.argv[1:] if argv is None else argv)
    with user_errors_exit(show_traceback):
        parser.error = fail  # argparse reports a bad command line through error(message)
        parser.formatter_class = HelpFormatter
        add_traceback_flag(parser)
        main(parser.parse_args(argv))


class HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, with each flag's default after its description (a flag whose default is None
    says in its description what it defaults to)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.option_strings and not action.required and action.default not in (None, argparse.SUPPRESS):
            return f"{action.help or ''} (default: %(default)s)"
        return action.help or ""


def add_traceback_flag(parser: argparse.ArgumentParser) -> None:
    """``--traceback`` in the help; ``split_traceback_flag`` takes it out of the arguments before parsing."""
    parser.add_argument(TRACEBACK_FLAG, action="store_true", help=f"show the full traceback of an error instead of one line; {TRACEBACK_ENV}=1 does the same")


def help_parser(main: Callable) -> argparse.ArgumentParser:
    """A parser that prints the help of a command run by ``run`` in argparse's style, as the argparse
    commands print theirs: each parameter of ``main`` as a flag, with its default and its description
    from the ``Args:`` section of ``main``'s docstring, else from ``FLAG_HELP``. Only its help is used:
    fire reads the flags."""
    summary, own = docstring_parts(main)
    descriptions = {**FLAG_HELP, **own}
    parser = argparse.ArgumentParser(prog=program_name(), description=summary, formatter_class=HelpFormatter)
    for name, parameter in inspect.signature(main).parameters.items():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        required = parameter.default is inspect.Parameter.empty
        default = None if required else parameter.default
        if parameter.annotation is bool or isinstance(default, bool):
            parser.add_argument(f"--{name}", action="store_true", default=default, help=descriptions.get(name))
        else:
            parser.add_argument(f"--{name}", required=required, default=default, help=descriptions.get(name))
    add_traceback_flag(parser)
    return parser


def docstring_parts(main: Callable) -> Tuple[str, Dict[str, str]]:
    """``main``'s docstring before ``Args:``, and each parameter's description in ``Args:``
    (``name: description``, continued on more deeply indented lines), joined into one line."""
    summary, _, section = (inspect.getdoc(main) or "").partition("\nArgs:\n")
    descriptions: Dict[str, str] = {}
    name = None
    for line in section.split("\n"):
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            name, descriptions[entry.group(1)] = entry.group(1), entry.group(2)
        elif name is not None and line.startswith("        "):
            descriptions[name] += " " + line.strip()
        else:
            name = None
    return summary.strip(), descriptions


def text_parsers(main: Callable) -> Dict[str, Callable[[str], object]]:
    """How fire reads the flags ``main`` declares as text: as the text typed.

    Fire reads every value as a Python literal where it can: ``--prompts "hello, world"`` would be two
    prompts, ``--system 42`` a number, ``--ckpt_dir True`` a boolean. A parameter annotated ``str``
    (or ``Optional[str]``) keeps the text; one that may also be a list of strings
    (``Union[str, List[str], None]``) is a list only when the text is a Python list or tuple literal.

    Returns:
        ``{parameter name: parse function}`` for ``fire.decorators.SetParseFns``.
    """
    parsers = {}
    for name, parameter in inspect.signature(main).parameters.items():
        annotation = parameter.annotation
        options = typing.get_args(annotation) or (annotation,)
        if str in options:
            parsers[name] = text_or_list if any(typing.get_origin(option) in (list, List) for option in options) else str
    return parsers


def text_or_list(text: str) -> Union[str, list]:
    """``text`` itself, unless it is a Python list or tuple literal: then that list."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return list(value) if isinstance(value, (list, tuple)) else text


def check_speculation_flags(speculate: Optional[str], speculate_k: int, draft_ckpt_dir: Optional[str]) -> None:
    """The examples' speculation flags, before anything loads: valid values, and a draft only with
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


def check_flags(main: Callable, argv: Sequence[str]) -> None:
    """Raise ValueError naming the first flag in ``argv`` that is not a parameter of ``main``, with
    the likely intended one and every known flag."""
    parameters = inspect.signature(main).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [name for name, p in parameters.items() if p.kind != inspect.Parameter.VAR_POSITIONAL]
    for typed, name in flags(argv):
        candidates = flag_candidates(name, known)
        if len(candidates) == 1:
            continue
        if candidates:  # fire expands a one-letter flag only when a single parameter starts with it
            raise ValueError(f"flag {typed} is ambiguous: it could be {', '.join('--' + c for c in candidates)}")
        close = [k for k in known if k.startswith(name)] or difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise ValueError(f"unknown flag {typed}{hint}; known flags: {', '.join('--' + k for k in known)}")


def flags(argv: Sequence[str]) -> Iterator[Tuple[str, str]]:
    """Each flag in ``argv`` as typed and as fire names it: ``--max-seq-len 8`` and
    ``--max_seq_len=8`` are ``max_seq_len``. A flag's value is skipped (a flag followed by another
    flag, or last, is a boolean); a lone ``-`` or ``--`` ends the function's flags (what follows is
    fire's own)."""
    index = 0
    while index < len(argv) and argv[index] not in ("-", "--"):
        argument = argv[index]
        index += 1
        if not is_flag(argument):
            continue
        typed = argument.split("=", 1)[0]
        yield typed, typed.lstrip("-").replace("-", "_")
        if "=" not in argument and index < len(argv) and not is_flag(argv[index]):
            index += 1  # the flag's value


def is_flag(argument: str) -> bool:
    """Fire's rule: a leading hyphen, except a negative number."""
    return argument.startswith("--") or re.match(r"^-[a-zA-Z]", argument) is not None


def flag_candidates(name: str, known: List[str]) -> List[str]:
    """The parameters fire could read flag ``name`` as: itself, ``no<parameter>`` (a boolean set
    False), fire's help, or, for one letter, every parameter starting with it."""
    if name in known or name in ("help", "h"):
        return [name]
    if name.startswith("no") and name[2:] in known:
        return [name[2:]]
    return [k for k in known if k.startswith(name)] if len(name) == 1 else []


def load_line(ckpt_dir: str, tokenizer_path: str, generator, seconds: float, quantize: Optional[str] = None) -> str:
    """What a command says once it has loaded a checkpoint: which files, where, in which dtype. A merged
    adapter, quantized weights and a KV cache in another dtype than the model's are named only when
    there are some, so that a plain model's line stays ``... (torch.float32) in 0.10 s``.

    Args:
        ckpt_dir: the checkpoint folder, as given.
        tokenizer_path: the tokenizer file used (given, or found by ``resolve_tokenizer_path``).
        generator: the loaded ``Llama``; its ``adapter_dir`` and ``kv_cache_dtype`` are named too.
        seconds: how long loading took.
        quantize: the ``--quantize`` value; the line then names the activations' dtype and the weights'.

    Returns:
        e.g. ``Loaded llama-2-7b/ with the adapter run/ (tokenizer: tokenizer.model) on cpu with 2 thread(s)
        (torch.bfloat16 activations, int4 weights, torch.float32 KV cache) in 9.12 s``.
    """
    dtype = f"{generator.dtype} activations, {quantize} weights" if quantize else str(generator.dtype)
    if generator.kv_cache_dtype != generator.dtype:
        dtype += f", {generator.kv_cache_dtype} KV cache"
    adapter = f" with the adapter {generator.adapter_dir}" if generator.adapter_dir is not None else ""
    device = f"cpu with {torch.get_num_threads()} thread(s)" if generator.device.type == "cpu" else str(generator.device)
    return f"Loaded {ckpt_dir}{adapter} (tokenizer: {tokenizer_path}) on {device} ({dtype}) in {seconds:.2f} s"


def compile_line(engine) -> Optional[str]:
    """What a command says after generating with ``--compile``: how long each compiled step took on
    first use, compilation included (the decode step; with ``--speculate`` the verification pass and
    the draft's step); None when nothing was compiled.

    Args:
        engine: the ``llama.engine.Engine`` that generated.
    """
    speculator = engine.speculator
    steps = [speculator.verify_forward] + ([speculator.draft_forward] if speculator.draft_forward is not None else [])
    times = [("the decode step", engine.runner.compile_seconds)] + [(f"the {step.name}", step.compile_seconds) for step in steps]
    compiled = [f"{name} in {seconds:.1f} s" for name, seconds in times if seconds is not None]
    return f"Compiled {', '.join(compiled)} (on first use, counted above)" if compiled else None


def program_name() -> str:
    """How the command was started: ``python -m llama.server`` or ``python example_chat.py``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return f"python {os.path.basename(sys.argv[0])}" if sys.argv and sys.argv[0] else "llama"
