"""Fine-tune a checkpoint on JSONL examples: LoRA, QLoRA (LoRA beside an int4 base) or every weight; on
answers (``--objective sft``, the default), on preference pairs (``dpo``) or on rewards of the model's own
samples (``grpo``): ``llama.training.objectives`` builds each, docs/post-training.md says what they do.

    python -m llama.finetune --ckpt_dir llama-2-7b-chat/ --data train.jsonl --out run/ --method lora
    torchrun --nproc_per_node 4 -m llama.finetune --ckpt_dir Llama-3.2-1B-Instruct/ --data train.jsonl --out run/

OUT receives ``metrics.jsonl`` (one line per optimizer step), ``loss.png``, for LoRA and QLoRA the adapter
in peft's format (``adapter_config.json``, ``adapter_model.safetensors``), and for full fine-tuning or
``--merge`` a checkpoint in the source's layout in ``OUT/checkpoint``. ``--save_every`` keeps the training
state in ``OUT/state`` and ``--resume`` continues it. Under torchrun the model is sharded with FSDP2 and
the examples of each step are split over the ranks; with ``--tensor_parallel N`` each layer is also split
within groups of N ranks, FSDP2 sharding across the groups (``llama.training.parallelize``): any number
of processes computes one process's losses.
"""

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from llama.chat.format import chat_format_for
from llama.checkpoints.hf import read_chat_template
from llama.checkpoints.loader import checkpoint_folder, layout_of, load_model, read_model_args
from llama.checkpoints.peft import merge_adapter, read_adapter, write_adapter
from llama.checkpoints.writers import write_checkpoint
from llama.cli import add_flags, run_parser
from llama.distributed import DTYPES, init_distributed, launched_as_rank0, resolve_device, set_threads
from llama.layers.lora import LoraConfig, apply_lora, parse_targets
from llama.layers.parallel import fused_layers, group_size
from llama.layers.quantize import (
    Quantization,
    check_activation_dtype,
    check_int4_shapes,
    quantizable_weights,
    training_cpu_dtype,
)
from llama.model import Transformer
from llama.options import EngineOptions
from llama.tokenizer import Tokenizer, resolve_tokenizer_path
from llama.training.grpo import ROLLOUTS_FILE
from llama.training.log import METRICS_FILE, PLOT_FILE, MetricsLog, peak_memory, plot_losses, trim_after
from llama.training.loop import Schedule, make_optimizer, train
from llama.training.objectives import (
    OBJECTIVES,
    READERS,
    Inputs,
    Placement,
    add_grpo_flags,
    add_objective_flags,
    check_grpo,
    check_objective_options,
    objective_settings,
)
from llama.training.parallelize import (
    clean_name,
    data_parallel_group,
    full_tensor,
    tensor_parallel_group,
    trainable_parameters,
    training_mesh,
    wrap_for_training,
)
from llama.training.state import check_resumable, load_objective_state, load_state, read_settings, save_state

logger = logging.getLogger("llama.finetune")

METHODS = ("lora", "qlora", "full")
QLORA_GROUP_SIZE = 64
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}


def compute_dtype(name: Optional[str], device: torch.device, method: str) -> torch.dtype:
    """--dtype, else bfloat16 where the device computes in it (a GPU that has it; for QLoRA, a CPU with
    bfloat16 instructions: ``training_cpu_dtype``), float32 elsewhere."""
    if name is not None:
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return training_cpu_dtype() if method == "qlora" else torch.float32


def run_settings(options: argparse.Namespace) -> dict:
    """What a resumed run must share with the run it continues: for full fine-tuning also the tensor
    parallelism, which the saved fused weights (wq, wk, wv; w1, w3) are laid out by, slice after slice."""
    settings = {
        "objective": options.objective,
        "method": options.method,
        "ckpt_dir": str(Path(options.ckpt_dir).resolve()),
        "data": str(Path(options.data).resolve()),
        "lora_rank": options.lora_rank,
        "lora_alpha": options.lora_alpha,
        "lora_targets": options.lora_targets,
        "batch_size": options.batch_size,
        "max_seq_len": options.max_seq_len,
        "pack": options.pack,
        "seed": options.seed,
    }
    if options.method == "full":
        settings["tensor_parallel"] = options.tensor_parallel
    return {**settings, **objective_settings(options)}


def check_options(options: argparse.Namespace, world_size: int) -> None:
    """Every flag that can be checked before anything is read; ``world_size``: the data-parallel ranks,
    which share each step's examples."""
    check_objective_options(options)
    if options.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {options.method!r}")
    if options.max_steps is not None and options.epochs is not None:
        raise ValueError("give --max_steps or --epochs, not both")
    for name in ("batch_size", "max_seq_len", "max_steps", "epochs", "micro_batch_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if options.objective == "grpo":
        check_grpo(options, world_size)
    else:
        micro = options.micro_batch_size or options.batch_size // world_size
        if options.batch_size % world_size or micro < 1 or (options.batch_size // world_size) % micro:
            raise ValueError(
                f"--batch_size {options.batch_size} must be divisible by the {world_size} rank(s) x "
                f"--micro_batch_size {options.micro_batch_size or '(default: --batch_size / ranks)'}"
            )
        options.micro_batch_size = micro
    if options.dtype is not None and options.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {options.dtype!r}")
    for name in ("eval_every", "save_every"):
        if getattr(options, name) < 0:
            raise ValueError(f"--{name} must be 0 (never) or a positive number of steps, got {getattr(options, name)}")
    out = Path(options.out)
    if options.resume:
        check_resumable(read_settings(out), run_settings(options), out)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"--out {options.out} already exists and is not empty: choose another, or --resume the run in it"
        )


def lora_config(options: argparse.Namespace) -> Optional[LoraConfig]:
    if options.method == "full":
        return None
    return LoraConfig(options.lora_rank, options.lora_alpha, options.lora_dropout, parse_targets(options.lora_targets))


def check_qlora(model_args, device: torch.device, dtype: torch.dtype, group) -> Quantization:
    """The int4 quantization of QLoRA's base, where int4 can run: the device's kernel, its dtype, the
    shapes of this rank's slices (split over ``group``)."""
    quantization = Quantization(4, QLORA_GROUP_SIZE)
    try:
        check_activation_dtype(quantization, device, dtype)
        with torch.device("meta"):
            model = Transformer(model_args, group)
        shapes = {name: tuple(m.weight.shape) for name, m in quantizable_weights(model).items()}
        check_int4_shapes(shapes, quantization)
    except ValueError as error:
        raise ValueError(f"--method qlora: the int4 base cannot run here: {error}") from None
    return quantization


def meta_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every weight of a fully fine-tuned model, whole, on the CPU, under Meta's keys (a collective
    under FSDP): each fused weight split into its parts (wq, wk, wv; w1, w3), which tensor parallelism
    interleaves (each rank's slice of every part, rank after rank)."""
    fused = {}  # a fused weight's name -> (its parts' Meta keys, their sizes)
    for part_module, (layer_key, layer) in fused_layers(model).items():
        keys, _ = fused.setdefault(clean_name(layer_key), ([], list(layer.parts.values())))
        keys.append(f"{clean_name(part_module)}.weight")
    state = {}
    for name, parameter in model.named_parameters():
        name, tensor = clean_name(name), full_tensor(parameter)
        if name in fused:
            keys, sizes = fused[name]  # each part's rows on one rank
            by_rank = [part.split(sizes) for part in tensor.split(sum(sizes))]
            state.update(zip(keys, (torch.cat(parts) for parts in zip(*by_rank))))
        else:
            state[name] = tensor
    return state


def adapter_tensors(model: torch.nn.Module) -> Dict[str, tuple]:
    """Meta's module name (``layers.0.attention.wq``) -> (A, B), whole, on the CPU (a collective under FSDP)."""
    pairs: Dict[str, dict] = {}
    for name, parameter in model.named_parameters():
        if ".adapters." in name:  # layers.0.attention.wqkv.adapters.wq.lora_A.weight
            module, _, rest = clean_name(name).partition(".adapters.")
            part, _, which = rest.partition(".")
            pairs.setdefault(f"{module.rpartition('.')[0]}.{part}", {})[which] = full_tensor(parameter)
    return {module: (parts["lora_A.weight"], parts["lora_B.weight"]) for module, parts in pairs.items()}


def finetune(options: argparse.Namespace) -> None:
    """The command, on every rank: check, read, load, wrap, train, write."""
    set_threads(options.threads)
    device = resolve_device(options.device)
    init_distributed(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    mesh = training_mesh(device, options.tensor_parallel)
    data_group = data_parallel_group(mesh)  # the ranks that share each step's examples
    check_options(options, group_size(data_group))
    lora = lora_config(options)
    dtype = compute_dtype(options.dtype, device, options.method)

    inputs = read_inputs(options)
    args, examples = inputs.args, inputs.examples
    quantization = check_qlora(args, device, dtype, tensor_parallel_group(mesh)) if options.method == "qlora" else None
    schedule = schedule_of(options, len(examples))
    max_steps = schedule.max_steps

    model = training_model(options, args, device, dtype, quantization, lora, mesh)
    parameters = trainable_parameters(model)
    optimizer = make_optimizer(parameters.values(), schedule.lr, options.weight_decay)
    # one process computes in dtype under autocast; FSDP2 casts the weights itself
    autocast = contextlib.nullcontext()
    if dtype != torch.float32 and mesh is None:
        autocast = torch.autocast(device.type, dtype=dtype)

    # before the saved state is loaded: a reference the objective computes from the model is the checkpoint's
    objective, evaluate_at = OBJECTIVES[options.objective](
        options,
        model,
        inputs,
        Placement(device, autocast, data_group, lambda: training_model(options, args, device, dtype, None, None, mesh)),
    )
    out = Path(options.out)
    start_step = start_of(options, parameters, optimizer, rank)
    if rank == 0:
        n_trainable = sum(p.numel() for p in parameters.values())
        logger.info(
            "%s %s: %d examples, %d steps of %d, %s parameters trained (%s), computing in %s on %d rank(s)",
            *(options.objective, options.method, len(examples), max_steps, options.batch_size, f"{n_trainable:,}"),
            *("adapters" if lora else "all", str(dtype).removeprefix("torch."), mesh.size() if mesh else 1),
        )
    save_at = saver(options, parameters, optimizer, objective)
    train(
        model,
        optimizer,
        objective,
        schedule,
        MetricsLog(out / METRICS_FILE, max_steps, every=max(1, max_steps // 20)),
        options.grad_clip,
        start_step,
        options.eval_every,
        evaluate_at,
        options.save_every,
        save_at,
    )
    write_outputs(options, model, lora, args, inputs.tokenizer_path, rank)
    logger.info("peak memory: %s", peak_memory(device))


def start_of(options: argparse.Namespace, parameters: dict, optimizer, rank: int) -> int:
    """The steps already done: with --resume, those of the saved state, loaded in place (and the logs' lines
    of later steps dropped: they are written again); else 0, OUT made."""
    out = Path(options.out)
    if not options.resume:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        return 0
    start_step = load_state(out, parameters, optimizer)
    if rank == 0:
        for name in (METRICS_FILE, ROLLOUTS_FILE):
            trim_after(out / name, start_step)
    return start_step


def saver(options: argparse.Namespace, parameters: dict, optimizer, objective):
    """``train``'s save_at (None without --save_every): the training state, with the objective's where it
    keeps one (GRPO's rollout in progress), which --resume loads here."""
    out, keeps_state = Path(options.out), hasattr(objective, "state_dict")
    if options.resume and keeps_state:
        objective.load_state_dict(load_objective_state(out))
    if not options.save_every:
        return None
    settings = run_settings(options)
    return lambda done: save_state(
        out, parameters, optimizer, done, settings, objective.state_dict() if keeps_state else None
    )


def read_inputs(options: argparse.Namespace) -> Inputs:
    """The tokenizer, the model's hyper-parameters, and the training and validation data of the objective."""
    tokenizer_path = resolve_tokenizer_path(options.ckpt_dir, options.tokenizer_path)
    tokenizer = Tokenizer(tokenizer_path)
    args = read_model_args(options.ckpt_dir, tokenizer, tokenizer_path, EngineOptions(1, options.max_seq_len))
    chat_format = chat_format_for(tokenizer, read_chat_template(options.ckpt_dir))
    read = READERS[options.objective]
    examples = read(options.data, tokenizer, chat_format, options.max_seq_len)
    val_examples = read(options.val_data, tokenizer, chat_format, options.max_seq_len) if options.val_data else []
    return Inputs(tokenizer_path, tokenizer, chat_format, args, examples, val_examples)


def schedule_of(options: argparse.Namespace, n_examples: int) -> Schedule:
    """The learning rate's schedule: ``--max_steps`` (default: ``--epochs`` over the examples), the warmup
    (default: 5% of the steps), the peak (default: the method's)."""
    max_steps = options.max_steps or max(1, (options.epochs or 1) * n_examples // options.batch_size)
    warmup = options.warmup_steps if options.warmup_steps is not None else max_steps // 20
    return Schedule(options.lr or DEFAULT_LR[options.method], max_steps, warmup, options.lr_schedule)


def training_model(
    options: argparse.Namespace,
    args,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Optional[Quantization],
    lora: Optional[LoraConfig],
    mesh,
) -> torch.nn.Module:
    """The model as it trains: this rank's slices of the layers its "tp" row of ``mesh`` splits, loaded
    (the base in the compute dtype when frozen, float32 when it trains: autocast or FSDP2 compute in
    ``dtype``), adapted (LoRA) and wrapped (``llama.training.parallelize``)."""
    base_dtype = torch.float32 if options.method == "full" else dtype
    model = load_model(
        options.ckpt_dir, args, device, base_dtype, quantization, group=tensor_parallel_group(mesh), training=True
    )
    if lora is not None:
        torch.manual_seed(options.seed)  # A's initial values depend on the seed alone (loading may draw numbers)
        apply_lora(model, lora)
    return wrap_for_training(
        model, options.activation_checkpointing, options.compile, mesh, dtype if dtype != torch.float32 else None
    )


def write_outputs(
    options: argparse.Namespace,
    model: torch.nn.Module,
    lora: Optional[LoraConfig],
    args,
    tokenizer_path: str,
    rank: int,
) -> None:
    """The adapter (LoRA, QLoRA), the checkpoint (full, --merge) and the loss curve, in OUT."""
    out = Path(options.out)
    if lora is not None:
        tensors = adapter_tensors(model)
        if rank == 0:
            write_adapter(str(out), tensors, lora, args, str(options.ckpt_dir))
            logger.info("wrote the adapter: %s", ", ".join(sorted(p.name for p in out.glob("adapter_*"))))
        if options.merge and rank == 0:
            write_merged(options, args, tokenizer_path)
    else:
        state = meta_state(model)
        if rank == 0:
            write_checkpoint(
                out / "checkpoint",
                options.ckpt_dir,
                tokenizer_path,
                args,
                state.items(),
                source_dtype(options.ckpt_dir, args),
            )
    if rank == 0:
        if options.merge or lora is None:
            logger.info("wrote %s", out / "checkpoint")
        plot_losses(out / METRICS_FILE, out / PLOT_FILE)


def source_dtype(ckpt_dir: str, args) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (its embedding's)."""
    return next(iter(checkpoint_folder(ckpt_dir).rank_tensors(args, layout_of(args), 0, 1)))[1].dtype


def write_merged(options: argparse.Namespace, args, tokenizer_path: str) -> None:
    """The source checkpoint with the adapter just written merged into its weights, read again from
    the source (a QLoRA base in memory is only its int4 rounding)."""
    layout = layout_of(args)
    adapter = read_adapter(options.out, args)
    tensors = merge_adapter(
        checkpoint_folder(options.ckpt_dir).rank_tensors(args, layout, 0, 1),
        adapter,
        {key: entry.split_dim for key, entry in layout.items()},
        0,
        1,
    )
    write_checkpoint(
        Path(options.out) / "checkpoint",
        options.ckpt_dir,
        tokenizer_path,
        args,
        tensors,
        source_dtype(options.ckpt_dir, args),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama.finetune", description=__doc__.split("\n\n")[0])
    add_flags(
        p,
        "ckpt_dir",
        ckpt_dir={
            "required": True,
            "help": ("the checkpoint to fine-tune: Meta's params.json + consolidated.NN.pth, or a Hugging Face folder"),
        },
    )
    p.add_argument(
        "--data",
        required=True,
        help='JSONL training data, per line: for sft {"messages": [...]}, {"prompt", "completion"} or {"text"}; '
        'for dpo {"prompt", "chosen", "rejected"}; for grpo {"prompt", ...}',
    )
    p.add_argument(
        "--objective",
        default="sft",
        choices=tuple(OBJECTIVES),
        help="sft: learn the examples' answers; dpo: prefer the chosen completions (preference pairs); "
        "grpo: reinforcement learning from rewards of completions the model samples",
    )
    p.add_argument("--out", required=True, help="the run's folder (new, or empty; with --resume, the run to continue)")
    p.add_argument(
        "--method",
        default="lora",
        choices=METHODS,
        help="lora: adapters beside the frozen weights; qlora: the same beside an int4 base; full: every weight",
    )
    add_flags(p, "tokenizer_path")
    add_method_flags(p)
    add_objective_flags(p)
    add_data_flags(p)
    add_run_flags(p)
    add_grpo_flags(p)
    return p


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """What is trained and how fast: the adapters, the optimizer and its schedule."""
    p.add_argument("--lora_rank", type=int, default=8, help="the rank r of each adapter B A")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="adapters are scaled by alpha / r")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="dropout of the adapters' input")
    p.add_argument(
        "--lora_targets",
        default="all",
        help="the linears adapted in every block: all, attention, or a list as wq,wv (or q_proj,v_proj)",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate; default: 2e-4 for lora and qlora, 2e-5 for full"
    )
    p.add_argument(
        "--lr_schedule",
        default="cosine",
        choices=["constant", "cosine"],
        help="after the warmup: constant, or cosine decay to 0",
    )
    p.add_argument("--warmup_steps", type=int, default=None, help="steps of linear warmup; default: 5%% of the steps")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW's decoupled weight decay (matrices only)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="largest gradient norm")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps; default: one epoch (--epochs)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data, instead of --max_steps; default: 1")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """How the examples are batched, validated, saved and written."""
    p.add_argument(
        "--batch_size", type=int, default=8, help="examples (for dpo: pairs) per optimizer step, over all ranks"
    )
    p.add_argument(
        "--micro_batch_size",
        type=int,
        default=None,
        help="examples per forward pass on a rank (gradients accumulate); for dpo pairs, each two rows of the pass; "
        "default: --batch_size / ranks",
    )
    p.add_argument(
        "--max_seq_len",
        type=int,
        default=512,
        help="the longest example in tokens (longer ones are dropped, and counted); the row length with --pack",
    )
    p.add_argument(
        "--pack",
        action="store_true",
        help="pack each micro-batch's examples into rows of --max_seq_len that cannot see each other",
    )
    p.add_argument(
        "--val_data",
        default=None,
        help="JSONL validation examples: loss and perplexity every --eval_every steps and at the end",
    )
    p.add_argument("--eval_every", type=int, default=0, help="steps between validations; 0: at the end only")
    p.add_argument(
        "--save_every",
        type=int,
        default=0,
        help="steps between saves of the training state in OUT/state (for --resume); 0: never",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run saved in --out to --max_steps, with the same settings"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="also write the checkpoint with the adapter merged into OUT/checkpoint (always for full)",
    )


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where and how the steps run: memory, compile, dtype, device, processes, threads, seed."""
    p.add_argument(
        "--activation_checkpointing",
        action="store_true",
        help="recompute each block's activations in the backward pass: less memory, more time",
    )
    p.add_argument("--compile", action="store_true", help="compile each block with torch.compile")
    p.add_argument(
        "--dtype",
        default=None,
        help=(
            "float32, bfloat16 or float16 compute; default: bfloat16 on a GPU that has it "
            "(and for qlora on a CPU with bfloat16 instructions), else float32"
        ),
    )
    add_flags(p, "device")
    p.add_argument(
        "--tensor_parallel",
        type=int,
        default=1,
        help="under torchrun, the ranks that split each layer "
        "between them (tensor parallelism); FSDP2 shards across the groups of that many ranks",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=(
            "CPU threads torch computes with; default: OMP_NUM_THREADS if set (1 per process under torchrun), "
            "else one per core (training times no thread count)"
        ),
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the data order and dropout")


def main(argv: Optional[List[str]] = None) -> None:
    # under torchrun every rank reads the same data: rank 0 says it once. Other libraries' INFO lines (matplotlib's
    # "generated new fontManager") are not the run's: only their warnings and errors show
    level = logging.INFO if launched_as_rank0() else logging.ERROR
    logging.basicConfig(level=max(level, logging.WARNING), format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("llama").setLevel(level)
    # DTensor's hint that it reduces a gradient's norm or gathers an adapter in two collectives is not the run's
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    run_parser(parser(), finetune, argv)


if __name__ == "__main__":
    main()
