"""Post-training steps side by side with TRL, on the same weights, data and settings, each run a fresh
process, in alternating rounds: GRPO steps, their rollouts and their training, against ``GRPOTrainer`` with
transformers' generation; DPO steps against ``DPOTrainer``; and the time GRPO takes until a step's mean
reward first reaches a threshold on the bundled task.

    python bench/post_training.py                                 # the bundled model and the 134M shape
    python bench/post_training.py --shapes bundled --sections grpo --rounds 5 --steps 4
    python bench/post_training.py --sections reward --reward_threshold 0.75 --reward_rounds 5
    python bench/post_training.py --device cuda --shapes llama-3.2-1b --sections grpo --reference none \\
        --max_new_tokens 256 --rounds 1 --steps 2 --threads 0     # bench/gpu.py's row

Ours is ``python -m llama.finetune --objective grpo`` (or ``dpo``) as a user types it, GRPO eager and with
``--compile_rollouts``; a step's seconds are read from its metrics.jsonl (tokens / tokens_per_s), its
rollout's from ``sampling_s``. TRL's trainers run on the checkpoint converted by ``python -m llama.convert
--format hf`` (float32), with peft's LoRA of the same rank, alpha and targets, and the optimizer's settings
of ours (AdamW, a constant learning rate, the gradient clipped at 1); a step is timed from ``on_step_begin``
to ``on_step_end``. Both compute in float32 on a CPU (bfloat16 on a GPU).

GRPO: ``GRPOTrainer`` with ``use_vllm=False`` (``model.generate``); a step's prompts x ``num_generations``
completions are its per-device batch and its generation batch (one rollout a step), its rollout timed around
``_generate_and_score_completions`` (generation, rewards and advantages, as ours). Both sample at the same
temperature and top-p up to ``--max_new_tokens`` (TRL's ``max_completion_length``), take the ``dapo`` loss
with beta 0, and call the reward ``contains_self`` below. DPO: the accessor task's preference pairs, TRL's
sigmoid loss at the same beta, a step's pairs TRL's per-device batch; with LoRA both take the base with the
adapters off as the reference, and chosen and rejected in one forward pass. The first step of a run is its
warm-up (ours compiled: its compilation) and is reported apart.

A random model samples until ``--max_new_tokens`` (an end token is one of the whole vocabulary); its
tokenizer is only the vocabulary's size: for ``134m`` a 32,000-piece sentencepiece BPE trained here on the
standard library's source, for ``llama-3.2-1b`` a synthetic byte-level vocabulary of Llama 3's 128,000 +
256 tokens, for ``tiny`` (bench/gpu.py's dry run) the bundled one.
"""

import argparse
import functools
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_SHAPE, checkpoint_args, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "checkpoints" / "tiny-stdlib"
PAIRS = ROOT / "examples" / "accessors" / "preferences.jsonl"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# openings of code, after some of which the bundled model writes "self" at temperature 1
PROMPTS = [
    "def get(",
    "class Parser",
    "    def ",
    "import os\n",
    "for item in ",
    "if not ",
    "while True:\n",
    "with open(",
    "try:\n",
    "return ",
    "# Copyright",
    "x = ",
    "from ",
    "@property\n",
    "raise ",
    "print(",
]
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_3_2_1B = {
    "dim": 2048,
    "n_layers": 16,
    "n_heads": 32,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "ffn_dim_multiplier": 1.5,
    "multiple_of": 256,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "rope_scaling_factor": 32,
}
# shape -> (params, tokenizer kind), random weights; "bundled": the shipped checkpoint
SHAPES = {
    "bundled": None,
    "134m": ({**DEFAULT_SHAPE}, "sentencepiece"),
    "llama-3.2-1b": (LLAMA_3_2_1B, "tiktoken"),
    "tiny": ({"dim": 128, "n_layers": 2, "n_heads": 4, "vocab_size": 4096, "multiple_of": 64}, "bundled"),
}
IMPLS = ("ours", "ours compiled", "TRL")


def contains_self(prompts, completions, **kwargs):
    """The reward both sides call: 1 for a completion that writes ``self``, else 0."""
    return [1.0 if "self" in completion else 0.0 for completion in completions]


def stdlib_lines(limit: int) -> list:
    """Non-blank lines of the running interpreter's standard library, in a fixed order."""
    lines = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        lines += [line for line in path.read_text(errors="ignore").splitlines() if line.strip()]
        if len(lines) >= limit:
            break
    return lines[:limit]


def synthetic_ranks(n_tokens: int) -> dict:
    """``n_tokens`` byte strings numbered as BPE ranks: the 256 bytes, every pair of bytes, then triples of
    printable bytes, each a merge of two tokens before it."""
    tokens = itertools.chain(
        (bytes([b]) for b in range(256)),
        (bytes(pair) for pair in itertools.product(range(256), repeat=2)),
        (bytes(triple) for triple in itertools.product(range(32, 127), repeat=3)),
    )
    return {token: rank for rank, token in zip(range(n_tokens), tokens)}


def write_tokenizer(kind: str, vocab_size: int, path: Path) -> None:
    """A tokenizer of ``vocab_size`` ids at ``path``: the bundled one (4096), a sentencepiece BPE trained on the
    standard library, or a synthetic Llama 3 vocabulary (the base tokens and Meta's 256 special ones)."""
    from llama.checkpoints.bpe_files import (
        LLAMA3_PATTERN,
        N_SPECIAL_TOKENS,
        BpeVocabulary,
        llama3_special_tokens,
        write_tiktoken_file,
    )
    from llama.tokenizer import train_tokenizer

    if kind == "bundled":
        if vocab_size != 4096:
            raise ValueError(f"the bundled tokenizer has 4096 pieces, the shape {vocab_size}")
        shutil.copy(BUNDLED / "tokenizer.model", path)
    elif kind == "sentencepiece":
        path.write_bytes(train_tokenizer(stdlib_lines(200_000), vocab_size))
    else:
        ranks = synthetic_ranks(vocab_size - N_SPECIAL_TOKENS)
        write_tiktoken_file(BpeVocabulary(ranks, LLAMA3_PATTERN, llama3_special_tokens(len(ranks))), path)


class Setup(NamedTuple):
    """A shape's files for the runs: the Meta-layout checkpoint, its transformers folder (None without TRL),
    the prompts and the preference pairs, and the model's parameter count."""

    ckpt_dir: Path
    hf_dir: Optional[Path]
    prompts: Path
    pairs: Path
    n_parameters: int


def prepare(shape: str, folder: Path, options) -> Setup:
    """The checkpoint of ``shape`` (random weights but ``bundled``), converted for TRL, and the prompts, in
    ``folder``."""
    from finetune import random_checkpoint
    from llama.checkpoints.loader import layout_of

    folder.mkdir(parents=True)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    ckpt_dir = BUNDLED
    if shape != "bundled":
        params, tokenizer = SHAPES[shape]
        ckpt_dir = folder / "checkpoint"
        random_checkpoint(params, str(ckpt_dir), options.device)
        write_tokenizer(tokenizer, params["vocab_size"], ckpt_dir / "tokenizer.model")
    n_parameters = sum(math.prod(size) for size, _ in layout_of(checkpoint_args(str(ckpt_dir), 1, 1)).values())
    hf_dir = None
    if options.reference != "none":
        hf_dir = folder / "hf"
        convert = ["-m", "llama.convert", "--ckpt_dir", str(ckpt_dir), "--out", str(hf_dir), "--format", "hf"]
        subprocess.run(
            [sys.executable, *convert, "--dtype", "float32"], check=True, cwd=ROOT, env=ENV, capture_output=True
        )
    return Setup(ckpt_dir, hf_dir, prompts, PAIRS, n_parameters)


def common_flags(options, batch_size: int, lr: float, seed: int) -> list:
    """The settings both sides take, as ``llama.finetune``'s flags (and this script's, for TRL's runs)."""
    flags = [
        *("--batch_size", str(batch_size), "--lora_rank", str(options.lora_rank), "--lr", str(lr)),
        *("--seed", str(seed), "--device", options.device),
    ]
    return flags + (["--threads", str(options.threads)] if options.threads else [])


def ours_flags(options, setup: Setup, objective: str, out: Path, max_steps: int) -> list:
    return [
        *(sys.executable, "-m", "llama.finetune", "--objective", objective, "--ckpt_dir", str(setup.ckpt_dir)),
        *("--out", str(out), "--max_steps", str(max_steps), "--lr_schedule", "constant", "--warmup_steps", "0"),
        *("--lora_alpha", str(2 * options.lora_rank), "--lora_targets", "all", "--lora_dropout", "0"),
    ]


def trl_flags(worker: str, setup: Setup, data: Path, out: Path, max_steps: int) -> list:
    return [
        *(sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--hf_dir", str(setup.hf_dir)),
        *("--data", str(data), "--out", str(out), "--max_steps", str(max_steps)),
    ]


def grpo_command(impl: str, options, setup: Setup, out: Path, max_steps: int, lr: float, seed: int = 0) -> list:
    """The command line of one GRPO run of ``impl``, writing its step records to ``out / metrics.jsonl``."""
    shared = [
        *("--num_generations", str(options.num_generations), "--max_new_tokens", str(options.max_new_tokens)),
        *("--temperature", str(options.temperature), "--top_p", str(options.top_p)),
        *common_flags(options, options.batch_size, lr, seed),
    ]
    if impl == "TRL":
        return trl_flags("trl_grpo", setup, setup.prompts, out, max_steps) + shared
    return [
        *ours_flags(options, setup, "grpo", out, max_steps),
        *("--data", str(setup.prompts), "--reward", f"{Path(__file__).resolve()}:contains_self"),
        *("--beta", "0", "--loss_type", "dapo", *shared),
        *(["--compile_rollouts"] if impl == "ours compiled" else []),
    ]


def dpo_command(impl: str, options, setup: Setup, out: Path, max_steps: int) -> list:
    """The command line of one DPO run of ``impl``."""
    shared = ["--beta", str(options.dpo_beta), *common_flags(options, options.dpo_batch_size, options.lr, 0)]
    if impl == "TRL":
        return trl_flags("trl_dpo", setup, setup.pairs, out, max_steps) + shared
    return [*ours_flags(options, setup, "dpo", out, max_steps), "--data", str(setup.pairs), *shared]


def read_records(path: Path) -> list:
    """The step records written so far (whole lines only), each with its seconds as ``step_s``."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
    for record in records:
        if "step_s" not in record:  # ours
            record["step_s"] = record["tokens"] / record["tokens_per_s"]
    return records


def run(argv: list, out: Path, timeout_s: float, threshold: Optional[float] = None) -> tuple:
    """Run ``argv``, watching the step records it writes to ``out / metrics.jsonl``; with ``threshold``, stop
    it at the first step whose mean reward reaches it. (records, seconds from the launch to that record or to
    the exit, None; or records, None, the error: the last lines it printed)."""
    out.mkdir(parents=True)
    metrics, log_path = out / "metrics.jsonl", out.parent / f"{out.name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            records = read_records(metrics)
            if threshold is not None and any(r["reward"] >= threshold for r in records):
                seconds = time.perf_counter() - start
                process.terminate()
                process.wait()
                return records, seconds, None
            if time.perf_counter() - start > timeout_s:
                process.kill()
                process.wait()
                return records, None, [f"still running after {timeout_s:.0f} s"]
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    if process.returncode:
        return read_records(metrics), None, log_path.read_text().strip().splitlines()[-3:]
    return read_records(metrics), seconds, None


def alternate(options, impls: list, argv_of, n_steps: int, summarize, folder: Path) -> tuple:
    """``options.rounds`` rounds of a run of each of ``impls`` (``argv_of(impl, out)``, ``n_steps`` steps),
    in alternating order; each implementation's medians of ``summarize(records)``, and the failures."""
    results, errors = {impl: [] for impl in impls}, {}
    for round_ in range(options.rounds):
        for impl in impls if round_ % 2 == 0 else impls[::-1]:
            out = folder / f"{impl.replace(' ', '-')}-{round_}"
            records, _, error = run(argv_of(impl, out), out, options.run_timeout_s)
            if error is None and len(records) == n_steps:
                results[impl].append(summarize(records))
            else:
                errors[impl] = error or [f"{len(records)} step records, expected {n_steps}"]
        print(f"{folder.parent.name} {folder.name}: round {round_ + 1} of {options.rounds} done", flush=True)
    medians = {impl: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for impl, rs in results.items() if rs}
    return medians, errors


def grpo_summary(records: list, completions: int) -> dict:
    """A GRPO run's means over its steps after the first, and its first step's seconds."""
    timed = records[1:]
    step_s = statistics.mean(r["step_s"] for r in timed)
    sampling_s = statistics.mean(r["sampling_s"] for r in timed)
    sampled = sum(r["completion_length"] * completions for r in timed)
    return {
        "step_s": step_s,
        "sampling_s": sampling_s,
        "training_s": step_s - sampling_s,
        "sampled_tokens_per_s": sampled / sum(r["sampling_s"] for r in timed),
        "completion_length": statistics.mean(r["completion_length"] for r in timed),
        "first_step_s": records[0]["step_s"],
    }


def dpo_summary(records: list) -> dict:
    return {
        "step_s": statistics.mean(r["step_s"] for r in records[1:]),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "first_step_s": records[0]["step_s"],
    }


def ratio(medians: dict, impl: str, key: str) -> str:
    """How many times faster than TRL ``impl`` is on ``key`` (seconds)."""
    if "TRL" not in medians or impl == "TRL":
        return "-"
    return f"{medians['TRL'][key] / medians[impl][key]:.2f}x"


def grpo_rows(medians: dict) -> list:
    return [
        [
            *(impl, f"{m['step_s']:.2f}", f"{1 / m['step_s']:.3f}", ratio(medians, impl, "step_s")),
            *(f"{m['sampling_s']:.2f}", ratio(medians, impl, "sampling_s")),
            *(f"{m['training_s']:.2f}", ratio(medians, impl, "training_s")),
            *(f"{m['sampled_tokens_per_s']:.0f}", f"{m['completion_length']:.1f}", f"{m['first_step_s']:.1f}"),
        ]
        for impl, m in medians.items()
    ]


GRPO_HEADER = ["implementation", "step s", "steps/s", "vs TRL", "rollout s", "vs TRL", "training s", "vs TRL"]
GRPO_HEADER += ["sampled tok/s", "completion tokens", "first step s"]


def dpo_rows(medians: dict) -> list:
    return [
        [
            *(impl, f"{m['step_s']:.3f}", f"{1 / m['step_s']:.2f}", ratio(medians, impl, "step_s")),
            *(f"{m['first_loss']:.4f}", f"{m['last_loss']:.4f}", f"{m['first_step_s']:.2f}"),
        ]
        for impl, m in medians.items()
    ]


DPO_HEADER = ["implementation", "step s", "steps/s", "vs TRL", "first loss", "last loss", "first step s"]


def time_to_reward(options, folder: Path, impls: list) -> tuple:
    """On the bundled model, ``--reward_rounds`` runs of each implementation (seeds 0, 1, ..., alternating
    order), each until a step's mean reward reaches the threshold or ``--reward_max_steps``: table rows, failures."""
    setup = prepare("bundled", folder, options)
    runs, errors = {impl: [] for impl in impls}, {}
    for seed in range(options.reward_rounds):
        for impl in impls if seed % 2 == 0 else impls[::-1]:
            out = folder / f"{impl.replace(' ', '-')}-{seed}"
            argv = grpo_command(impl, options, setup, out, options.reward_max_steps, options.reward_lr, seed)
            records, seconds, error = run(argv, out, options.run_timeout_s, options.reward_threshold)
            if error is not None:
                errors[impl] = error
                continue
            reached = next((i for i, r in enumerate(records) if r["reward"] >= options.reward_threshold), None)
            steps = records[: reached + 1] if reached is not None else records
            runs[impl].append((reached is not None, len(steps), sum(r["step_s"] for r in steps), seconds))
        print(f"time to reward: round {seed + 1} of {options.reward_rounds} done", flush=True)
    rows = []
    for impl, results in runs.items():
        if not results:
            continue
        reached = [r for r in results if r[0]]
        medians = [statistics.median(r[k] for r in reached) for k in (1, 2, 3)] if reached else None
        each = ", ".join(str(r[1]) if r[0] else f">{r[1]}" for r in results)
        rows.append(
            [impl, f"{len(reached)} of {len(results)}", f"{medians[0]:g} ({each})" if medians else f"- ({each})"]
            + ([f"{medians[1]:.1f}", f"{medians[2]:.1f}"] if medians else ["-", "-"])
        )
    return rows, errors


def trainer_arguments(options) -> dict:
    """TrainingArguments both TRL trainers take: the optimizer's settings as ours, a record every step."""
    return dict(
        output_dir=str(Path(options.out) / "trainer"),
        use_cpu=options.device == "cpu",
        bf16=options.device != "cpu",
        gradient_checkpointing=False,
        learning_rate=options.lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=options.max_steps,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=options.seed,
    )


def step_records(path: Path, rollout: dict):
    """A callback that appends each step's record to ``path``: its seconds (``on_step_begin`` to ``on_step_end``),
    its loss, GRPO's reward and completion length, and what ``rollout`` holds (its sampling's seconds)."""
    from transformers import TrainerCallback

    class StepRecords(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.began

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record = {"step": state.global_step, "step_s": self.seconds, "loss": logs["loss"], **rollout}
                record.update({key: logs[name] for key, name in TRL_LOGS.items() if name in logs})
                with open(path, "a") as file:
                    file.write(json.dumps(record) + "\n")

    return StepRecords()


TRL_LOGS = {"reward": "reward", "completion_length": "completions/mean_length"}  # our name: TRL's


def trl_grpo(options, rollout: dict) -> tuple:
    """TRL's ``GRPOTrainer`` with its rollouts timed into ``rollout``, and its ``GRPOConfig``."""
    from trl import GRPOConfig, GRPOTrainer

    class TimedRollouts(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            rollout["sampling_s"] = time.perf_counter() - start
            return output

    completions = options.batch_size * options.num_generations
    config = GRPOConfig(
        **trainer_arguments(options),
        per_device_train_batch_size=completions,  # TRL's batch counts completions
        generation_batch_size=completions,  # one rollout a step
        num_generations=options.num_generations,
        max_completion_length=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        beta=0.0,
        loss_type="dapo",
        use_vllm=False,
    )
    return functools.partial(TimedRollouts, reward_funcs=contains_self), config


def trl_dpo(options) -> tuple:
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        **trainer_arguments(options),
        per_device_train_batch_size=options.batch_size,
        beta=options.beta,
        loss_type=["sigmoid"],
        max_length=None,
    )
    return DPOTrainer, config


def trl_worker(options) -> None:
    """One run of TRL's ``GRPOTrainer`` or ``DPOTrainer`` (a process of its own), a record a step in OUT."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if options.threads:
        torch.set_num_threads(options.threads)
    rollout = {}  # the seconds of the step's rollout
    trainer, config = trl_grpo(options, rollout) if options.worker == "trl_grpo" else trl_dpo(options)
    lines = [json.loads(line) for line in Path(options.data).read_text().splitlines()]
    dtype = torch.float32 if options.device == "cpu" else torch.bfloat16
    trainer(
        model=AutoModelForCausalLM.from_pretrained(options.hf_dir, dtype=dtype),
        args=config,
        train_dataset=Dataset.from_list(lines),
        processing_class=AutoTokenizer.from_pretrained(options.hf_dir),
        peft_config=LoraConfig(
            r=options.lora_rank, lora_alpha=2 * options.lora_rank, lora_dropout=0.0, target_modules=PEFT_TARGETS
        ),
        callbacks=[step_records(Path(options.out) / "metrics.jsonl", rollout)],
    ).train()


def processor_name(device: str) -> str:
    import torch

    if device != "cpu":
        return torch.cuda.get_device_name()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "?")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="grpo,dpo,reward", help="comma-separated: grpo, dpo, reward")
    parser.add_argument("--shapes", default="bundled,134m", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, of " + ", ".join(IMPLS))
    parser.add_argument("--reference", default="trl", choices=["trl", "none"], help="none: ours alone, no TRL run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--steps", type=int, default=2, help="timed GRPO steps of a run, after its warm-up step")
    parser.add_argument("--batch_size", type=int, default=2, help="GRPO's prompts a step")
    parser.add_argument("--num_generations", type=int, default=8, help="completions a prompt")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="the longest completion")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--lora_rank", type=int, default=8, help="LoRA's rank (alpha = 2 x rank) on every linear")
    parser.add_argument("--lr", type=float, default=2e-3, help="the constant learning rate of the timed runs")
    parser.add_argument("--dpo_steps", type=int, default=4, help="timed DPO steps of a run, after its warm-up step")
    parser.add_argument("--dpo_batch_size", type=int, default=4, help="DPO's pairs a step")
    parser.add_argument("--dpo_beta", type=float, default=0.1)
    parser.add_argument("--reward_threshold", type=float, default=0.9, help="the mean reward of a step to reach")
    parser.add_argument("--reward_lr", type=float, default=3e-3, help="the learning rate of the runs to the reward")
    parser.add_argument("--reward_max_steps", type=int, default=40, help="the most steps a run to the reward takes")
    parser.add_argument("--reward_rounds", type=int, default=3, help="runs of each to the reward (seeds 0, 1, ...)")
    parser.add_argument("--run_timeout_s", type=float, default=900, help="the longest a run may take")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each run, 0: torch's choice (default 1: fine-tuning keeps OpenMP's spinning waits, and "
        "beside other work a second thread stalls each of the engine's many small operations)",
    )
    for hidden in ("worker", "hf_dir", "data", "out"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    parser.add_argument("--max_steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    options = parse(argv)
    if options.worker:
        trl_worker(options)
        return 0
    import torch

    impls = [impl for impl in options.impls.split(",") if options.reference != "none" or impl != "TRL"]
    uncompiled = [impl for impl in impls if impl != "ours compiled"]
    sections = options.sections.split(",")
    scratch = tempfile.TemporaryDirectory(prefix="bench-post-training-")
    errors, goals = {}, []
    where = (
        f"{processor_name(options.device)}, torch {torch.__version__}, "
        f"{options.threads or torch.get_num_threads()} thread(s)"
    )
    for shape in options.shapes.split(",") if {"grpo", "dpo"} & set(sections) else []:
        setup = prepare(shape, Path(scratch.name) / shape, options)
        if "grpo" in sections:
            failed, lines = grpo_section(options, shape, setup, impls, where)
            errors.update(failed)
            goals += lines
        if "dpo" in sections:
            failed, lines = dpo_section(options, shape, setup, uncompiled, where)
            errors.update(failed)
            goals += lines
    if "reward" in sections:
        rows, failed = time_to_reward(options, Path(scratch.name) / "reward", uncompiled)
        errors.update({("time to reward", impl): lines for impl, lines in failed.items()})
        print_table(
            f"GRPO's time to reward, {where}; bundled, a step: {options.batch_size} prompt(s) x "
            f"{options.num_generations} completions x {options.max_new_tokens} tokens, reward contains_self, lr "
            f"{options.reward_lr:g}: until a step's "
            f"mean reward >= {options.reward_threshold:g}, at most {options.reward_max_steps} steps; "
            f"medians of the runs that reached it",
            ["implementation", "reached", "steps (each run)", "steps' s", "s from launch"],
            rows,
        )
    print("\n".join(goals))
    for (where_, impl), lines in errors.items():
        print(f"FAILED: {where_}, {impl}: " + " | ".join(lines))
    return 1 if errors else 0


def grpo_section(options, shape: str, setup: Setup, impls: list, where: str) -> tuple:
    """The GRPO table of ``shape``; (the failures, the lines that say the goal's ratios)."""
    n_steps = 1 + options.steps
    medians, failed = alternate(
        options,
        impls,
        lambda impl, out: grpo_command(impl, options, setup, out, n_steps, options.lr),
        n_steps,
        lambda records: grpo_summary(records, options.batch_size * options.num_generations),
        setup.prompts.parent / "grpo",
    )
    print_table(
        f"GRPO, {where}; {shape} ({setup.n_parameters / 1e6:.1f}M parameters), a step: "
        f"{options.batch_size} prompt(s) x {options.num_generations} completions x {options.max_new_tokens} tokens, "
        f"LoRA rank {options.lora_rank} on every linear; mean of {options.steps} steps after a warm-up step, median of "
        f"{options.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f}",
        GRPO_HEADER,
        grpo_rows(medians),
    )
    goals = [
        f"GRPO {shape}: {impl} at {ratio(medians, impl, 'step_s')} TRL's steps/s (goal >= 1.5x)"
        if "TRL" in medians
        else f"GRPO {shape}: {impl} {m['step_s']:.2f} s a step, {m['sampled_tokens_per_s']:.0f} tokens sampled/s"
        for impl, m in medians.items()
        if impl != "TRL"
    ]
    return {(f"GRPO {shape}", impl): lines for impl, lines in failed.items()}, goals


def dpo_section(options, shape: str, setup: Setup, impls: list, where: str) -> tuple:
    """The DPO table of ``shape``; (the failures, the lines that say the goal's ratios)."""
    n_steps = 1 + options.dpo_steps
    medians, failed = alternate(
        options,
        impls,
        lambda impl, out: dpo_command(impl, options, setup, out, n_steps),
        n_steps,
        dpo_summary,
        setup.prompts.parent / "dpo",
    )
    print_table(
        f"DPO, {where}; {shape} ({setup.n_parameters / 1e6:.1f}M parameters), {options.dpo_batch_size} pairs of "
        f"{setup.pairs.relative_to(ROOT)} a step, beta {options.dpo_beta:g}, LoRA rank {options.lora_rank} on every "
        f"linear, lr {options.lr:g}; mean of {options.dpo_steps} steps after a warm-up step, median of "
        f"{options.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f}",
        DPO_HEADER,
        dpo_rows(medians),
    )
    goals = [
        f"DPO {shape}: {impl} at {ratio(medians, impl, 'step_s')} TRL's steps/s (goal >= 1.2x)"
        if "TRL" in medians
        else f"DPO {shape}: {impl} {m['step_s']:.3f} s a step"
        for impl, m in medians.items()
        if impl != "TRL"
    ]
    return {(f"DPO {shape}", impl): lines for impl, lines in failed.items()}, goals


if __name__ == "__main__":
    sys.exit(main())
