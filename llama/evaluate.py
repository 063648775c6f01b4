"""Evaluate a checkpoint with EleutherAI's lm-evaluation-harness (``pip install -e ".[eval]"``).

    python -m llama.evaluate --ckpt_dir llama-2-7b/ --tasks hellaswag,arc_easy --batch_size 8
    python -m llama.evaluate --ckpt_dir checkpoints/tiny-stdlib --tasks my_task --include_path my_tasks/ \\
        --output_path out/ --log_samples

Any checkpoint ``Llama.build`` loads (Meta's shards or a Hugging Face folder, quantized or not, split
over the processes of a torchrun job) runs as lm-eval's model (``llama.evaluation.harness.LlamaLM``). The
results table is printed as lm-eval prints it and, with ``--output_path``, written as lm-eval writes
it: ``OUT/<checkpoint>/results_<date>.json``, and ``samples_<task>_<date>.jsonl`` with
``--log_samples``. Under torchrun every rank evaluates and rank 0 prints and writes. Tasks from
lm-eval's registry read their datasets from the Hugging Face hub or its cache; ``--include_path``
adds a folder of task YAMLs (a local task reads a local file with ``dataset_path: json``).
"""

import argparse
import json
import os
import time

# OpenMP's waiting threads sleep instead of spinning (docs/performance.md): set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llama.cli import add_flags, fail, load_line, options_from, run_parser
from llama.distributed import set_threads
from llama.options import EngineOptions, LoadOptions

INSTALL_HINT = 'lm-evaluation-harness is not installed: pip install -e ".[eval]"'


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m llama.evaluate", description="Evaluate a checkpoint on lm-evaluation-harness tasks."
    )
    add_flags(parser, "ckpt_dir", "tokenizer_path", ckpt_dir={"required": True})
    parser.add_argument(
        "--tasks", required=True, help="comma-separated task (or group) names, lm-eval's or --include_path's"
    )
    parser.add_argument("--include_path", default=None, help="a folder of task YAML files to add to lm-eval's tasks")
    parser.add_argument(
        "--num_fewshot",
        type=int,
        default=None,
        help="examples in each prompt; default: each task's own (0 if it has none)",
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help="documents per task (a fraction below 1); default: all. For testing only",
    )
    parser.add_argument(
        "--batch_size", type=int, default=8, help="rows scored or generated together (the engine's slots)"
    )
    add_flags(
        parser,
        "max_seq_len",
        max_seq_len={
            "default": 2048,
            "help": ("the context in tokens (lm-eval's max_length); longer inputs lose their oldest tokens"),
        },
    )
    parser.add_argument(
        "--output_path",
        default=None,
        help="a folder to write results_<date>.json (and the samples) into, under the checkpoint's name",
    )
    parser.add_argument(
        "--log_samples",
        action="store_true",
        help="also write each document's prompt, answers and scores (needs --output_path)",
    )
    parser.add_argument(
        "--apply_chat_template", action="store_true", help="write each prompt in the model's chat format"
    )
    parser.add_argument(
        "--fewshot_as_multiturn",
        action="store_true",
        help="with --apply_chat_template: each few-shot example as a turn of the dialog",
    )
    parser.add_argument("--system_instruction", default=None, help="a system message (or prefix) for every prompt")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="lm-eval's seed for Python's random module (its other seeds stay at their defaults)",
    )
    add_flags(parser, "adapter_dir", "quantize", "kv_cache_dtype", "device", "dtype", "threads")
    run_parser(parser, evaluate, argv)


def check_args(args: argparse.Namespace) -> list:
    """The task names, and every flag checked before anything loads."""
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not tasks:
        raise ValueError(f"--tasks names no task: {args.tasks!r}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer, got {args.batch_size}")
    if args.max_seq_len < 2:
        raise ValueError(f"--max_seq_len must be at least 2, got {args.max_seq_len}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.log_samples and args.output_path is None:
        raise ValueError("--log_samples writes the samples into --output_path: give one")
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise ValueError("--fewshot_as_multiturn needs --apply_chat_template")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise FileNotFoundError(f"--include_path {args.include_path} is not a folder")
    return tasks


def task_manager(include_path, tasks: list):
    """lm-eval's tasks, with those of ``include_path``; every name of ``tasks`` must be one. When
    ``include_path`` holds them all it is read alone: indexing lm-eval's own task files (over ten
    thousand) takes most of a minute on a small machine."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([name]) for name in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [name for name in tasks if not manager.match_tasks([name])]
    if unknown:
        where = (
            f"lm-eval's tasks or {include_path}"
            if include_path
            else "lm-eval's tasks (a folder of your own: --include_path)"
        )
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: not in {where}")
    return manager


def evaluate(args: argparse.Namespace) -> None:
    """Run the tasks of ``--tasks`` on the checkpoint; print the table, write the results."""
    tasks = check_args(args)
    try:
        import lm_eval
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.utils import make_table
    except ImportError:
        fail(INSTALL_HINT)
    import torch.distributed as dist

    from llama.evaluation.harness import LlamaLM
    from llama.generation import Llama
    from llama.tokenizer import resolve_tokenizer_path

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_threads(args.threads)
    manager = task_manager(args.include_path, tasks)
    load = options_from(
        LoadOptions,
        args,
        tokenizer_path=resolve_tokenizer_path(args.ckpt_dir, args.tokenizer_path),
        time_threads=args.threads is None,
    )
    start = time.perf_counter()
    engine = EngineOptions(
        max_batch_size=args.batch_size, max_seq_len=args.max_seq_len, kv_cache_dtype=args.kv_cache_dtype
    )
    generator = Llama.from_options(load, engine)
    seconds = time.perf_counter() - start
    print(load_line(load.ckpt_dir, load.tokenizer_path, generator, seconds, load.quantize), flush=True)
    model_args = {
        "pretrained": args.ckpt_dir,
        **({"peft": args.adapter_dir} if args.adapter_dir else {}),  # lm-eval's hf backend's name for it
        "dtype": str(generator.dtype).removeprefix("torch."),
        "quantize": args.quantize,
        "max_seq_len": args.max_seq_len,
        **({"kv_cache_dtype": args.kv_cache_dtype} if args.kv_cache_dtype else {}),
    }
    tracker = EvaluationTracker(output_path=args.output_path) if args.output_path else None
    results = lm_eval.simple_evaluate(
        model=LlamaLM(generator),
        model_args=model_args,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=str(generator.device),
        limit=args.limit,
        log_samples=args.log_samples,
        evaluation_tracker=tracker,
        system_instruction=args.system_instruction,
        apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn,
        task_manager=manager,
        random_seed=args.seed,
    )
    if results is None or (dist.is_initialized() and dist.get_rank() != 0):
        return  # another rank prints and writes
    report(results, tracker, model_args, args, make_table)


def report(results: dict, tracker, model_args: dict, args: argparse.Namespace, make_table) -> None:
    """Write the results (and the samples) where ``--output_path`` says; print lm-eval's table."""
    samples = results.pop("samples", None)
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        for task_name in results["configs"] if samples else []:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(
        f"llama ({json.dumps(model_args)}), limit: {args.limit}, num_fewshot: {args.num_fewshot}, "
        f"batch_size: {args.batch_size}"
    )
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))


if __name__ == "__main__":
    main()
