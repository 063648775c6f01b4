"""lm-evaluation-harness two ways on the same weights and tasks, side by side in one run: ``python -m
llama.evaluate``'s path, and lm-eval's ``local-completions`` backend against ``python -m llama.server``.
The same numbers, and the time each takes.

    python bench/evaluate_server.py                          # the bundled model, 3 rounds, 1 thread each
    python bench/evaluate_server.py --quick                  # a smoke run: 40 questions, 2 files, 1 round
    python bench/evaluate_server.py --models 134M --questions 20 --files 1 --rounds 2

The tasks are local files written to a temporary folder, built from the bundled model's held-out
standard-library files (``train.py --print_heldout``):

- heldout_next_line (multiple choice, acc and acc_norm): --questions code contexts (the --context_lines
  lines before a line of at least 8 characters), the true next line among 4, the other 3 drawn from other
  held-out files;
- heldout_files (rolling log-likelihood: word and byte perplexity, bits per byte): the first --files
  held-out files, each scored in lm-eval's rolling windows.

The two paths, each timed as one ``lm_eval.simple_evaluate`` call per task (building the task and reading
its data included, the same on both sides), with lm-eval's bootstrap of the standard errors off (100,000
resamples of the documents by default, the same work on both sides, outside what is compared):

- llama.evaluate: in this process, what the command runs: ``LlamaLM`` on a ``Llama`` of --slots rows and
  a context of --max_seq_len, loaded once before the rounds (its load time printed apart). The command's
  own start (imports, loading) is left out, as the server's is.
- server: ``local-completions`` in this process, a client of one ``python -m llama.server`` subprocess
  (started once; its start-up time printed apart) with --slots slots and a context of --max_seq_len + 2:
  lm-eval's API backends keep ``max_length - 1`` tokens of a request and score rolling windows of
  ``max_length - 2`` (docs/evaluation.md), so that both sides score the same tokens. --request_batch
  prompts a request, --num_concurrent requests at once, tokenized by lm-eval with the checkpoint's
  tokenizer written as a Hugging Face folder.

Both compute in float32 on the CPU with --threads torch threads (this process's for the in-process run,
the server's ``--threads`` for the other; the client's own work, tokenizing and reading JSON, runs in this
process beside it). Rounds alternate which path goes first. Prints each metric both ways, their difference,
the median seconds each and their ratio; how many requests' log-likelihoods differ by more than 1e-4
(relative, tests/test_evaluate.py's tolerance), the largest difference, and whether every is-greedy flag
agrees; the CPU seconds of a run in this process and in the server's; the CPU, the thread count and the
load average.

--models 134M evaluates a random 134M checkpoint (stories110M's shapes, the bundled tokenizer padded to its
32,000 tokens): its perplexities mean nothing, its times and the agreement do.
"""

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# as llama.evaluate and the server: OpenMP's idle threads sleep; the tasks read local files only
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the progress bars lm-eval does not switch on itself

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import print_table  # noqa: E402
from bench.house import random_134m  # noqa: E402
from bench.kv_quantized import machine  # noqa: E402
from bench.server import Server  # noqa: E402
from llama.checkpoints.files import BUNDLED  # noqa: E402
from llama.checkpoints.writers import write_hf_tokenizer  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

PATHS = ("llama.evaluate", "server")
CHOICE_TASK, ROLLING_TASK = "heldout_next_line", "heldout_files"
TASKS = {
    CHOICE_TASK: {
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # a field's name: its text as it is, no template
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": "",  # the context ends with its newline, a choice begins with its indentation
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    },
    ROLLING_TASK: {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    },
}
TOLERANCE = 1e-4  # relative, a request's log-likelihood the two ways (tests/test_evaluate.py's)
MIN_LINE = 8  # characters of a line, spaces aside, to be asked for or offered as a choice


def heldout_texts() -> list:
    import train

    return [p.read_text(encoding="utf-8") for p in train.split_files(5)[1]]


def next_line_docs(texts: list, questions: int, context_lines: int, seed: int = 0) -> list:
    """Multiple-choice documents: a context of ``context_lines`` lines, the line after it and 3 lines of other
    files as its choices, shuffled."""
    rng = random.Random(seed)
    files = [text.splitlines(keepends=True) for text in texts]
    asked = [(f, i) for f, lines in enumerate(files) for i in range(context_lines, len(lines))]
    asked = [(f, i) for f, i in asked if len(files[f][i].strip()) >= MIN_LINE]
    if not 0 < questions <= len(asked):
        raise ValueError(f"--questions must be 1 to {len(asked)} (the held-out lines to ask), got {questions}")
    docs = []
    for f, i in rng.sample(asked, questions):
        truth, others = files[f][i], []
        while len(others) < 3:
            g = rng.choice([g for g in range(len(files)) if g != f])
            line = rng.choice(files[g])
            if len(line.strip()) >= MIN_LINE and line != truth and line not in others:
                others.append(line)
        choices = [truth, *others]
        rng.shuffle(choices)
        docs.append(
            {"context": "".join(files[f][i - context_lines : i]), "choices": choices, "answer": choices.index(truth)}
        )
    return docs


def write_tasks(folder: Path, args) -> Path:
    """Each task as a YAML file (JSON is YAML) beside its JSON Lines data."""
    texts = heldout_texts()
    docs = {
        CHOICE_TASK: next_line_docs(texts, args.questions, args.context_lines),
        ROLLING_TASK: [{"text": text} for text in texts[: args.files]],
    }
    for name, config in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs[name]))
        source = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"}
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **source, **config}))
    return folder


def checkpoint(model: str, scratch: Path) -> Path:
    return BUNDLED if model == "bundled" else Path(random_134m(scratch / "134m"))


def in_process_lm(ckpt_dir: Path, args):
    """``llama.evaluate``'s model: ``LlamaLM`` on a float32 CPU ``Llama``."""
    from llama.evaluation.harness import LlamaLM
    from llama.generation import Llama

    generator = Llama.build(
        str(ckpt_dir), max_seq_len=args.max_seq_len, max_batch_size=args.slots, device="cpu", dtype="float32"
    )
    return LlamaLM(generator)


def start_server(ckpt_dir: Path, scratch: Path, args) -> Server:
    settings = argparse.Namespace(
        slots=args.slots, max_seq_len=args.max_seq_len + 2, device="cpu", prefill_chunk=256, threads=args.threads
    )
    flags = ["--dtype", "float32", "--served_model_name", "bench"]
    return Server("server", settings, scratch / f"server-{ckpt_dir.name}.log", ckpt_dir=ckpt_dir, flags=flags)


def server_lm(server: Server, ckpt_dir: Path, scratch: Path, args):
    """lm-eval's ``local-completions`` on ``server``, tokenizing with the checkpoint's tokenizer as a Hugging
    Face folder (its tokenizer files only)."""
    from lm_eval.api.registry import get_model

    folder = scratch / f"hf-tokenizer-{ckpt_dir.name}"
    folder.mkdir()
    tokenizer_path = str(ckpt_dir / "tokenizer.model")
    write_hf_tokenizer(folder, Tokenizer(tokenizer_path), tokenizer_path, args.max_seq_len + 2)
    model_args = (
        f"model=bench,base_url=http://127.0.0.1:{server.port}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={folder},add_bos_token=True,max_length={args.max_seq_len + 2},num_concurrent={args.num_concurrent}"
    )
    return get_model("local-completions").create_from_arg_string(model_args, {"batch_size": args.request_batch})


def evaluate(lm, task: str, manager, limit=None) -> dict:
    """lm-eval's results of one task."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0
    )


def cpu_seconds(pid: int) -> float:
    """The CPU time another process has used (Linux's /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def metrics(results: dict, task: str) -> dict:
    return {
        key.split(",")[0]: value
        for key, value in results["results"][task].items()
        if "," in key and "stderr" not in key
    }


def answers(results: dict, task: str) -> list:
    """Each request's (log-likelihood, is-greedy or None), in the documents' order."""
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    found = []
    for sample in samples:
        for resp in sample["resps"]:
            answer = resp[0]
            found.append(tuple(answer) if isinstance(answer, (tuple, list)) else (answer, None))
    return found


def run_model(model: str, tasks: Path, scratch: Path, args) -> None:
    from lm_eval.tasks import TaskManager

    ckpt_dir = checkpoint(model, scratch)
    start = time.perf_counter()
    ours = in_process_lm(ckpt_dir, args)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    server = start_server(ckpt_dir, scratch, args)
    started = time.perf_counter() - start
    try:
        lms = {"llama.evaluate": ours, "server": server_lm(server, ckpt_dir, scratch, args)}
        print(f"\n{model}: {ckpt_dir}; in-process load {loaded:.1f} s, server start-up {started:.1f} s", flush=True)
        manager = TaskManager(include_path=str(tasks), include_defaults=False)
        for lm in lms.values():
            for task in TASKS:
                evaluate(lm, task, manager, limit=2)  # warm-up: the datasets cached, the first requests served
        timings, results = timed_rounds(lms, server.process.pid, manager, args)
    finally:
        server.stop()
    report(model, timings, results, args)


def timed_rounds(lms: dict, server_pid: int, manager, args) -> tuple:
    """Each task through each path, --rounds times, which path goes first alternating. Returns the
    (seconds, this process's CPU seconds, the server's CPU seconds) of each run by (task, path), and the
    last round's results by (task, path)."""
    timings = {(task, path): [] for task in TASKS for path in PATHS}
    results = {}
    for r in range(args.rounds):
        order = PATHS if r % 2 == 0 else PATHS[::-1]
        for task in TASKS:
            for path in order:
                before = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
                results[task, path] = evaluate(lms[path], task, manager)
                after = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
                timings[task, path].append([b - a for a, b in zip(before, after)])
        times = ", ".join(f"{task} {path} {t[-1][0]:.2f} s" for (task, path), t in timings.items())
        print(f"round {r + 1}/{args.rounds}: {times}", flush=True)
    return timings, results


def report(model: str, timings: dict, results: dict, args) -> None:
    rows, notes = [], []
    for task in TASKS:
        ours, served = (metrics(results[task, path], task) for path in PATHS)
        # the medians of (seconds, this process's CPU seconds, the server's) of each path
        (seconds, cpu, _), (server_seconds, client_cpu, server_cpu) = (
            [statistics.median(t) for t in zip(*timings[task, path])] for path in PATHS
        )
        times = [f"{seconds:.2f}", f"{server_seconds:.2f}", f"{server_seconds / seconds:.2f}x"]
        for i, (name, value) in enumerate(ours.items()):
            row = [task if i == 0 else "", name, f"{value:.6g}", f"{served[name]:.6g}"]
            rows.append(row + [f"{abs(value - served[name]):.2e}"] + (times if i == 0 else ["", "", ""]))
        notes.append(agreement(task, *(answers(results[task, path], task) for path in PATHS)))
        notes.append(
            f"  CPU seconds a run: llama.evaluate {cpu:.2f}; the server path {client_cpu:.2f} in lm-eval's process "
            f"+ {server_cpu:.2f} in the server's"
        )
    header = ["task", "metric", "llama.evaluate", "server", "|difference|", "evaluate s", "server s", "server/evaluate"]
    print_table(f"{model}, median seconds of {args.rounds} round(s)", header, rows)
    for note in notes:
        print(note)
    print(machine(args))


def agreement(task: str, ours: list, served: list) -> str:
    """How far apart the two paths' answers to each request are."""
    relative = [abs(a[0] - b[0]) / max(abs(b[0]), 1e-30) for a, b in zip(ours, served)]
    worst = max(range(len(relative)), key=relative.__getitem__)
    apart = sum(r > TOLERANCE for r in relative)
    line = (
        f"{task}: {len(ours)} requests, {apart} of them more than {TOLERANCE:g} apart (relative); the largest "
        f"difference request {worst}'s: {ours[worst][0]:.6f} against {served[worst][0]:.6f}"
    )
    if ours[0][1] is not None:
        line += f"; is-greedy flags equal: {all(a[1] == b[1] for a, b in zip(ours, served))}"
    return line


def quiet_libraries() -> None:
    """Only errors from lm-eval, datasets and transformers (a document longer than the tokenizer's context is
    expected: lm-eval cuts it into windows)."""
    import datasets
    import transformers

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bundled"], choices=["bundled", "134M"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in-process and the server's")
    parser.add_argument("--questions", type=int, default=300, help="multiple-choice documents")
    parser.add_argument("--context_lines", type=int, default=12, help="lines of code before each question's line")
    parser.add_argument("--files", type=int, default=8, help="held-out files scored for perplexity")
    parser.add_argument(
        "--max_seq_len", type=int, default=254, help="llama.evaluate's context; the server's is 2 longer"
    )
    parser.add_argument("--slots", type=int, default=8, help="rows computed together (both engines' slots)")
    parser.add_argument("--request_batch", type=int, default=16, help="prompts a request (lm-eval's batch_size)")
    parser.add_argument("--num_concurrent", type=int, default=1, help="requests lm-eval sends at once")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 questions, 2 files, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.files, args.rounds = 40, 2, 1
    torch.set_num_threads(args.threads)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as folder:
        scratch = Path(folder)
        (scratch / "tasks").mkdir()
        tasks = write_tasks(scratch / "tasks", args)
        for model in args.models:
            run_model(model, tasks, scratch, args)


if __name__ == "__main__":
    main()
