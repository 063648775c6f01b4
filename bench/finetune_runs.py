"""Whole LoRA fine-tuning runs from the command line, side by side with transformers + peft: the same
checkpoint, examples, steps, batch, rank, targets and learning rate, each run a fresh process timed
from start to exit, in alternating rounds.

Ours is ``python -m llama.finetune`` as a user types it. The reference is what a transformers user
writes: ``AutoModelForCausalLM`` and ``AutoTokenizer`` on the checkpoint converted to a Hugging Face
folder (converted once, untimed), peft's ``get_peft_model``, the examples tokenized as the project
tokenizes prompt/completion pairs (BOS + prompt, completion + EOS, -100 on the prompt), right-padded
batches, AdamW, and ``save_pretrained``. Prints the median whole-run seconds of each and the
seconds of their training steps alone (ours from its metrics.jsonl, the reference's timed around its
loop).

    python bench/finetune_runs.py                                   # the bundled model, 150 steps of 16
    python bench/finetune_runs.py --ckpt_dir "" --dim 768 --n_layers 12 --n_heads 12 --steps 10
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "checkpoints" / "tiny-stdlib"
EXAMPLES = ROOT / "examples" / "accessors" / "train.jsonl"


def reference_run(args: argparse.Namespace) -> None:
    """The transformers + peft run (in its own process); prints the seconds of its steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=targets)
    )
    examples = []
    for line in Path(args.data).read_text().splitlines():
        record = json.loads(line)
        prompt = tokenizer(record["prompt"])["input_ids"]  # BOS + prompt
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt + completion, [-100] * len(prompt) + completion))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    model.train()
    order, start = [], time.perf_counter()
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            order += torch.randperm(len(examples)).tolist()
        batch, order = [examples[i] for i in order[: args.batch_size]], order[args.batch_size :]
        width = max(len(tokens) for tokens, _ in batch)
        input_ids = torch.tensor([tokens + [0] * (width - len(tokens)) for tokens, _ in batch])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in batch])
        mask = torch.tensor([[1] * len(tokens) + [0] * (width - len(tokens)) for tokens, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    steps_seconds = time.perf_counter() - start
    model.save_pretrained(args.out)
    print(json.dumps({"steps_seconds": steps_seconds, "loss": loss.item()}))


def timed(command, env) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ckpt_dir", default=str(BUNDLED), help='a checkpoint in Meta\'s layout; "": a random one of the shape below'
    )
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n_layers", type=int, default=12)
    parser.add_argument("--n_heads", type=int, default=12)
    parser.add_argument("--n_kv_heads", type=int, default=None)
    parser.add_argument(
        "--vocab_size", type=int, default=4096, help="the bundled tokenizer's, which a random checkpoint takes"
    )
    parser.add_argument("--data", default=str(EXAMPLES), help="prompt/completion JSONL")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hf_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_worker:
        return reference_run(args)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = args.ckpt_dir
        if not ckpt_dir:
            sys.path.insert(0, str(ROOT / "bench"))
            import shutil

            from common import random_checkpoint

            ckpt_dir = random_checkpoint(argparse.Namespace(**vars(args), ckpt_dtype="bfloat16"), f"{tmp}/ckpt")
            shutil.copy(BUNDLED / "tokenizer.model", ckpt_dir)
        hf_dir = f"{tmp}/hf"
        subprocess.run(
            [sys.executable, "-m", "llama.convert", "--ckpt_dir", ckpt_dir, "--out", hf_dir, "--format", "hf"],
            check=True,
            env=env,
            cwd=ROOT,
            capture_output=True,
        )
        threads = ["--threads", str(args.threads)] if args.threads else []
        ours = [
            sys.executable,
            "-m",
            "llama.finetune",
            "--ckpt_dir",
            ckpt_dir,
            "--data",
            args.data,
            "--max_steps",
            str(args.steps),
            "--batch_size",
            str(args.batch_size),
            "--lora_rank",
            str(args.lora_rank),
            "--lora_alpha",
            str(2 * args.lora_rank),
            "--lora_targets",
            "all",
            "--lr",
            str(args.lr),
            "--seed",
            str(args.seed),
            *threads,
        ]
        reference = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--reference_worker",
            "--hf_dir",
            hf_dir,
            "--data",
            args.data,
            "--steps",
            str(args.steps),
            "--batch_size",
            str(args.batch_size),
            "--lora_rank",
            str(args.lora_rank),
            "--lr",
            str(args.lr),
            "--seed",
            str(args.seed),
            *threads,
        ]
        results = {"ours": [], "transformers + peft": []}
        for round_ in range(args.rounds):
            out = f"{tmp}/ours{round_}"
            seconds = timed(ours + ["--out", out], env)
            metrics = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
            results["ours"].append(
                (seconds, sum(m["tokens"] / m["tokens_per_s"] for m in metrics if "tokens_per_s" in m))
            )
            report = f"{tmp}/reference{round_}.json"
            start = time.perf_counter()
            done = subprocess.run(
                reference + ["--out", f"{tmp}/ref{round_}"],
                check=True,
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - start
            Path(report).write_text(done.stdout)
            results["transformers + peft"].append(
                (seconds, json.loads(done.stdout.strip().splitlines()[-1])["steps_seconds"])
            )
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
    import torch

    print(
        f"\n{Path(ckpt_dir).name if args.ckpt_dir else f'random dim {args.dim}, {args.n_layers} layers'}: "
        f"{args.steps} LoRA steps "
        f"of {args.batch_size} (rank {args.lora_rank}, every linear), "
        f"{args.threads or torch.get_num_threads()} thread(s), "
        f"{torch.backends.cpu.get_cpu_capability()} kernels; median of {args.rounds} alternating rounds, seconds"
    )
    whole = {name: statistics.median(r[0] for r in runs) for name, runs in results.items()}
    steps = {name: statistics.median(r[1] for r in runs) for name, runs in results.items()}
    print(f"{'':22}{'whole run':>12}{'steps':>10}")
    for name in results:
        print(f"{name:22}{whole[name]:12.2f}{steps[name]:10.2f}")
    reference = "transformers + peft"
    print(
        f"{'speed ours / theirs':22}{whole[reference] / whole['ours']:11.2f}x{steps[reference] / steps['ours']:9.2f}x"
    )


if __name__ == "__main__":
    main()
