"""python -m llama.finetune against independent references: transformers' loss with labels built by
hand, peft's gradients and logits on transformers' model of the same weights, and the same run
packed, resumed, or on two processes."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BUNDLED, SMALL_PARAMS, to_transformers
from llama import Llama
from llama.checkpoints.loader import load_model
from llama.checkpoints.peft import read_adapter, write_adapter
from llama.finetune import adapter_tensors, main as finetune
from llama.layers.lora import LoraConfig, apply_lora
from llama.layers.loss import causal_lm_loss
from llama.model import ModelArgs
from llama.tokenizer import Tokenizer
from llama.training.state import check_resumable

ROOT = Path(__file__).resolve().parent.parent
DIALOG = [
    {"role": "system", "content": "Answer in digits."},
    {"role": "user", "content": "two plus two?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and times three?"},
    {"role": "assistant", "content": "12"},
]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(ckpt_dir, data, out, *flags, tokenizer_path=None):
    extra = ["--tokenizer_path", tokenizer_path] if tokenizer_path else []
    finetune(["--ckpt_dir", str(ckpt_dir), "--data", str(data), "--out", str(out), "--threads", "1", *extra, *flags])
    return metrics(Path(out))


def hand_llama2_labels(sp, dialog):
    """Meta's Llama 2 chat format written out: each exchange BOS [INST] user [/INST] answer EOS, the
    system text inside the first user message; only the answer and its EOS are learnt."""
    users = [dialog[1]["content"], dialog[3]["content"]]
    users[0] = f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{users[0]}"
    tokens, labels = [], []
    for user, answer in zip(users, [dialog[2]["content"], dialog[4]["content"]]):
        prompt = [1] + sp.encode(f"[INST] {user} [/INST]")
        turn = [1] + sp.encode(f"[INST] {user} [/INST] {answer} ") + [2]
        assert turn[: len(prompt)] == prompt
        tokens += turn
        labels += [-100] * len(prompt) + turn[len(prompt) :]
    return tokens, labels


def test_step0_loss_of_a_chat_equals_transformers_with_labels_built_by_hand(make_checkpoint, tokenizer_path, tmp_path):
    ckpt_dir, state = make_checkpoint(n_shards=2)  # Meta's layout in two shards
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": DIALOG}])
    first = run(
        ckpt_dir,
        data,
        tmp_path / "out",
        "--batch_size",
        "1",
        "--max_steps",
        "1",
        "--max_seq_len",
        "96",
        tokenizer_path=tokenizer_path,
    )[0]
    tokens, labels = hand_llama2_labels(Tokenizer(tokenizer_path).sp_model, DIALOG)
    reference = to_transformers(state, SMALL_PARAMS, 512)
    with torch.no_grad():
        expected = reference(torch.tensor([tokens]), labels=torch.tensor([labels])).loss.item()
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["tokens"] == len(tokens)


def read_model_args_small():
    return ModelArgs.from_dict({**SMALL_PARAMS, "vocab_size": 512, "max_seq_len": 64, "max_batch_size": 1})


def test_lora_logits_and_gradients_equal_peft_on_transformers_and_peft_reads_the_adapter(checkpoint, tmp_path):
    from peft import PeftModel

    ckpt_dir, state = checkpoint
    args = read_model_args_small()
    config = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    model = apply_lora(load_model(ckpt_dir, args, torch.device("cpu"), torch.float32), config)
    torch.manual_seed(1)
    for name, module in model.named_modules():
        if name.endswith("lora_B"):  # nonzero, so that the adapter changes the logits and A gets a gradient
            torch.nn.init.normal_(module.weight, std=0.05)
    write_adapter(str(tmp_path), adapter_tensors(model), config, args, ckpt_dir)
    peft_model = PeftModel.from_pretrained(to_transformers(state, SMALL_PARAMS, 512), str(tmp_path), is_trainable=True)

    torch.manual_seed(2)
    tokens = torch.randint(3, 512, (2, 24))
    labels = tokens.clone()
    labels[:, :10] = -100
    loss = causal_lm_loss(model(tokens), labels)
    loss.backward()
    peft_loss = peft_model(input_ids=tokens, labels=labels).loss
    peft_loss.backward()
    assert loss.item() == pytest.approx(peft_loss.item(), rel=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(tokens), peft_model(input_ids=tokens).logits, atol=1e-4)

    # our gradients, written as an adapter, are peft's gradients in peft's layout
    for name, module in model.named_modules():
        if name.endswith(("lora_A", "lora_B")):
            module.weight.data = module.weight.grad
    (tmp_path / "grads").mkdir()
    write_adapter(str(tmp_path / "grads"), adapter_tensors(model), config, args, ckpt_dir)

    ours = load_file(str(tmp_path / "grads" / "adapter_model.safetensors"))
    theirs = {name.replace(".default", ""): p.grad for name, p in peft_model.named_parameters() if p.grad is not None}
    assert set(ours) == set(theirs) and len(ours) == 2 * 7 * args.n_layers
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-5, rtol=1e-4), key


MEMORY = [
    {"prompt": f"def scale_{i}(x):\n", "completion": f"    return x * {a} + {b}\n"}
    for i, (a, b) in enumerate([(3, 21), (5, 2), (7, 9), (2, 8)])
]
LEARNING_RATES = {"lora": "1e-2", "qlora": "1e-2", "full": "2e-3"}


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """The bundled model after 16 steps on four prompt/completion pairs, with each method (LoRA merged too)."""
    folder = tmp_path_factory.mktemp("memorised")
    data = write_jsonl(folder / "pairs.jsonl", MEMORY)
    runs = {}
    for method, lr in LEARNING_RATES.items():
        merge = ["--merge"] if method == "lora" else []
        runs[method] = (
            run(
                BUNDLED,
                data,
                folder / method,
                "--method",
                method,
                "--lr",
                lr,
                "--max_steps",
                "16",
                "--batch_size",
                "4",
                "--warmup_steps",
                "0",
                "--lr_schedule",
                "constant",
                *merge,
            ),
            folder / method,
        )
    return runs


@pytest.mark.parametrize("method", list(LEARNING_RATES))
def test_the_bundled_model_learns_to_complete_four_pairs_with_each_method(memorised, method):
    losses, out = memorised[method]
    assert losses[-1]["loss"] < 0.1 * losses[0]["loss"]
    if method == "full":
        generator = Llama.build(str(out / "checkpoint"), max_seq_len=64, max_batch_size=4)  # alone: its own tokenizer
    else:
        generator = Llama.build(
            str(BUNDLED),
            max_seq_len=64,
            max_batch_size=4,
            adapter_dir=str(out),
            quantize="int4" if method == "qlora" else None,
        )
    completions = generator.text_completion([pair["prompt"] for pair in MEMORY], temperature=0, max_gen_len=12)
    assert sum(c["generation"].startswith(pair["completion"]) for c, pair in zip(completions, MEMORY)) >= 3
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["step"] for r in losses] == list(range(1, 17)) and all(
        {"lr", "tokens", "tokens_per_s"} <= set(r) for r in losses
    )


def readme_fine_tuning_commands():
    """The commands of README.md's fine-tuning section, each as its arguments."""
    section = (ROOT / "README.md").read_text().split("### Fine-tuning\n", 1)[1].split("\n### ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()]


def test_the_readmes_fine_tuning_command_teaches_the_bundled_model_prompts_it_held_out(tmp_path, monkeypatch):
    train_command, completion_command = readme_fine_tuning_commands()
    assert train_command[:3] == ["python", "-m", "llama.finetune"]
    assert completion_command[:2] == ["python", "example_text_completion.py"]
    monkeypatch.chdir(ROOT)  # the commands' paths are the repository's
    flags = dict(zip(train_command[3::2], train_command[4::2]))
    train, held_out = (
        [json.loads(line) for line in Path(flags[flag]).read_text().splitlines()] for flag in ("--data", "--val_data")
    )
    seen = [pair["prompt"].split() for pair in train]  # "# VERB NAME"
    for pair in held_out:  # a verb and a name training saw, never together
        _, verb, name = pair["prompt"].split()
        assert ["#", verb, name] not in seen
        assert any(v == verb for _, v, _ in seen) and any(n == name for _, _, n in seen)
    shown = ast.literal_eval(completion_command[completion_command.index("--prompts") + 1])
    assert set(shown) <= {pair["prompt"] for pair in held_out}

    out = tmp_path / "run"
    finetune([str(out) if arg == flags["--out"] else arg for arg in train_command[3:]] + ["--threads", "1"])
    assert metrics(out)[-1]["val_loss"] < 0.2  # the bundled model's: 2.64

    def completed_exactly(adapter_dir):
        generator = Llama.build(str(BUNDLED), max_seq_len=64, max_batch_size=len(held_out), adapter_dir=adapter_dir)
        completions = generator.text_completion([pair["prompt"] for pair in held_out], temperature=0, max_gen_len=24)
        return sum(c["generation"] == pair["completion"] for c, pair in zip(completions, held_out))  # and stopped there

    assert completed_exactly(None) == 0
    assert completed_exactly(str(out)) >= 36  # 39 measured ("# get target" returns self._parent)


def test_an_adapter_merged_on_load_equals_the_merged_checkpoint_and_has_an_identity(memorised):
    _, out = memorised["lora"]
    with_adapter = Llama.build(str(BUNDLED), max_seq_len=64, max_batch_size=1, adapter_dir=str(out))
    tokens = torch.tensor(
        [with_adapter.tokenizer.encode(MEMORY[0]["prompt"] + MEMORY[0]["completion"], bos=True, eos=True)]
    )
    merged = Llama.build(str(out / "checkpoint"), max_seq_len=64, max_batch_size=1)
    base = Llama.build(str(BUNDLED), max_seq_len=64, max_batch_size=1)
    with torch.no_grad():
        logits = with_adapter.model(tokens)
        assert (logits - merged.model(tokens)).abs().max() < 0.1  # the checkpoint's weights are rounded to bfloat16
        assert (logits - base.model(tokens)).abs().max() > 1
    assert len(with_adapter.adapter_id) == 64 and base.adapter_id is None
    assert read_adapter(str(out), with_adapter.model.params).identity == with_adapter.adapter_id


VARIED = [{"text": "import os\n" * n} for n in (1, 3, 2, 5, 4, 1, 2, 3)] + [{"messages": DIALOG}] * 4


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("varied") / "varied.jsonl", VARIED)


def test_packed_rows_give_the_losses_of_padded_rows(checkpoint, tokenizer_path, varied_data, tmp_path):
    ckpt_dir, _ = checkpoint
    flags = ["--max_steps", "3", "--batch_size", "4", "--micro_batch_size", "2", "--max_seq_len", "96", "--lr", "1e-2"]
    padded = run(ckpt_dir, varied_data, tmp_path / "padded", *flags, tokenizer_path=tokenizer_path)
    packed = run(ckpt_dir, varied_data, tmp_path / "packed", *flags, "--pack", tokenizer_path=tokenizer_path)
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=1e-5)
    assert all(r["tokens"] % 96 == 0 for r in packed)  # whole rows of --max_seq_len


def test_a_resumed_run_gives_the_losses_of_an_uninterrupted_one(
    checkpoint, tokenizer_path, varied_data, tmp_path, capsys
):
    ckpt_dir, _ = checkpoint
    flags = [
        "--batch_size",
        "4",
        "--max_seq_len",
        "96",
        "--lr",
        "1e-2",
        "--lora_dropout",
        "0.2",
        "--lr_schedule",
        "constant",
    ]
    whole = run(ckpt_dir, varied_data, tmp_path / "whole", "--max_steps", "4", *flags, tokenizer_path=tokenizer_path)
    run(
        ckpt_dir,
        varied_data,
        tmp_path / "parts",
        "--max_steps",
        "2",
        "--save_every",
        "2",
        *flags,
        tokenizer_path=tokenizer_path,
    )
    resumed = run(
        ckpt_dir, varied_data, tmp_path / "parts", "--max_steps", "4", "--resume", *flags, tokenizer_path=tokenizer_path
    )
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], rel=1e-6)
    with pytest.raises(SystemExit):
        run(
            ckpt_dir,
            varied_data,
            tmp_path / "parts",
            "--max_steps",
            "6",
            "--resume",
            "--method",
            "full",
            *flags,
            tokenizer_path=tokenizer_path,
        )
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: --resume: ") and "method was 'lora', now 'full'" in error


def test_two_processes_under_torchrun_give_one_process_losses_and_state_one_process_resumes(
    checkpoint, tokenizer_path, varied_data, tmp_path
):
    ckpt_dir, _ = checkpoint
    validation = write_jsonl(tmp_path / "validation.jsonl", VARIED[:3])  # 3 micro-batches: one rank scores an empty one
    flags = [
        "--batch_size",
        "4",
        "--micro_batch_size",
        "1",
        "--max_seq_len",
        "96",
        "--lr",
        "1e-2",
        "--lr_schedule",
        "constant",
        "--val_data",
        validation,
        "--eval_every",
        "2",
    ]  # constant: the schedule of 2 steps is that of 3
    single = run(ckpt_dir, varied_data, tmp_path / "one", "--max_steps", "3", *flags, tokenizer_path=tokenizer_path)
    assert [r["step"] for r in single if "val_loss" in r] == [2, 3]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "llama.finetune",
        "--ckpt_dir",
        ckpt_dir,
        "--tokenizer_path",
        tokenizer_path,
        "--data",
        varied_data,
        "--out",
        str(tmp_path / "two"),
        "--max_steps",
        "2",
        "--save_every",
        "2",
        *flags,
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("peak memory:") == 1 and result.stderr.count("loading") == 1  # rank 0 speaks for both
    # the two ranks' sharded state, resumed by one process for the last step
    two = run(
        ckpt_dir, varied_data, tmp_path / "two", "--max_steps", "3", "--resume", *flags, tokenizer_path=tokenizer_path
    )
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in single], rel=1e-5)
    assert [r["val_loss"] for r in two if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in single if "val_loss" in r], rel=1e-5
    )
    ours, theirs = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("one", "two"))
    assert max((ours[key] - theirs[key]).abs().max().item() for key in ours) < 1e-5  # float32 rounding (entries ~1e-2)


def test_four_processes_splitting_each_layer_in_pairs_give_one_process_losses_and_adapter(
    checkpoint, tokenizer_path, varied_data, tmp_path
):
    """--tensor_parallel 2 on 4 ranks: each layer split within a pair of ranks, FSDP2 across the pairs (a 2-D mesh)."""
    ckpt_dir, _ = checkpoint
    validation = write_jsonl(tmp_path / "validation.jsonl", VARIED[:3])
    flags = [
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--micro_batch_size",
        "1",
        "--max_seq_len",
        "96",
        "--lr",
        "1e-2",
        "--lr_schedule",
        "constant",
        "--val_data",
        validation,
        "--eval_every",
        "2",
    ]
    single = run(ckpt_dir, varied_data, tmp_path / "one", *flags, tokenizer_path=tokenizer_path)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "4",
        "-m",
        "llama.finetune",
        "--ckpt_dir",
        ckpt_dir,
        "--tokenizer_path",
        tokenizer_path,
        "--data",
        varied_data,
        "--out",
        str(tmp_path / "four"),
        "--tensor_parallel",
        "2",
        *flags,
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    four = metrics(tmp_path / "four")
    assert [r["loss"] for r in four] == pytest.approx([r["loss"] for r in single], rel=1e-5)
    assert [r["val_loss"] for r in four if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in single if "val_loss" in r], rel=1e-5
    )
    ours, theirs = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("one", "four"))
    assert ours.keys() == theirs.keys() and all(ours[key].shape == theirs[key].shape for key in ours)
    # float32 rounding (entries ~1e-2), which Adam's division by a second moment near zero magnifies for a few entries
    assert max((ours[key] - theirs[key]).abs().max().item() for key in ours) < 1e-4


def test_a_full_run_resumes_only_at_the_tensor_parallelism_its_fused_weights_were_saved_by(tmp_path):
    check_resumable(
        {"method": "full"}, {"method": "full", "tensor_parallel": 1}, tmp_path
    )  # a run that did not record it: 1
    with pytest.raises(ValueError, match="tensor_parallel was 2, now 1"):
        check_resumable({"method": "full", "tensor_parallel": 2}, {"method": "full", "tensor_parallel": 1}, tmp_path)


@pytest.mark.parametrize(
    "lines, flags, error",
    [
        (['{"text": "a"}', '{"text": '], [], r"data.jsonl, line 2: not valid JSON"),
        (
            [json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
            [],
            r"data.jsonl, line 1: the dialog has no assistant reply",
        ),
        (
            [json.dumps({"messages": [{"role": "robot", "content": "hi"}]})],
            [],
            r"line 1: message 0 has an unknown role 'robot'",
        ),
        ([], [], r"data.jsonl: no examples \(the file is empty\)"),
        (
            ['{"text": "' + "import os " * 80 + '"}'],
            ["--max_seq_len", "16"],
            r"every one of its 1 examples is longer than --max_seq_len 16",
        ),
        (['{"text": "a"}'], ["--lora_targets", "wq,q_gate"], r"--lora_targets: unknown name\(s\) \['q_gate'\]"),
        (
            ['{"text": "a"}'],
            ["--batch_size", "6", "--micro_batch_size", "4"],
            r"--batch_size 6 must be divisible by the 1 rank\(s\) x --micro_batch_size 4",
        ),
        (['{"text": "a"}'], ["--resume"], r"--resume: .*state/run.json not found"),
        (
            ['{"text": "a"}'],
            ["--tensor_parallel", "2"],
            r"--tensor_parallel 2 must divide the 1 process\(es\) of the job",
        ),
    ],
)
def test_bad_input_is_one_line_before_anything_is_written(
    checkpoint, tokenizer_path, tmp_path, capsys, lines, flags, error
):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(SystemExit) as exit:
        run(checkpoint[0], data, tmp_path / "out", *flags, tokenizer_path=tokenizer_path)
    assert exit.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: ") and re.search(error, message), message
    assert not (tmp_path / "out").exists()


def test_the_log_says_what_a_trainer_needs_and_nothing_of_decoding_or_of_other_libraries(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", MEMORY)
    env = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}  # decoding times threads
    env.update(PYTHONPATH=str(ROOT), MPLCONFIGDIR=str(tmp_path / "mpl"))  # no font cache: matplotlib says it makes one
    command = [
        sys.executable,
        "-m",
        "llama.finetune",
        "--ckpt_dir",
        str(BUNDLED),
        "--data",
        data,
        "--out",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--batch_size",
        "4",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = [line.split(" ", 1)[1] for line in result.stderr.splitlines()]  # without the time
    expected = [
        "loaded sentencepiece model from",
        "rank 0/1: loading",
        "sft lora: 4 examples, 2 steps of 4,",
        "step 1/2 ",
        "step 2/2 ",
        "wrote the adapter:",
        "peak memory:",
    ]
    assert len(messages) == len(expected) and all(m.startswith(e) for m, e in zip(messages, expected)), result.stderr


def test_qlora_where_int4_cannot_hold_the_weights_is_refused(make_checkpoint, tokenizer_path, tmp_path, capsys):
    ckpt_dir, _ = make_checkpoint(params={**SMALL_PARAMS, "dim": 48, "n_heads": 4, "n_kv_heads": 2})
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}])
    with pytest.raises(SystemExit):
        run(ckpt_dir, data, tmp_path / "out", "--method", "qlora", tokenizer_path=tokenizer_path)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "--method qlora: the int4 base cannot run here: " in message
        and "not a multiple of the group size 64" in message
    )
    assert not (tmp_path / "out").exists()


def test_examples_longer_than_max_seq_len_are_dropped_and_counted(tmp_path, tokenizer_path, caplog):
    from llama.chat.format import chat_format_for
    from llama.training.data import read_examples

    tokenizer = Tokenizer(tokenizer_path)
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "x"}, {"text": "import os " * 40}, {"text": "y"}])
    examples = read_examples(data, tokenizer, chat_format_for(tokenizer), max_seq_len=16)
    assert len(examples) == 2 and "dropped 1 of 3 examples longer than --max_seq_len 16 tokens" in caplog.text


@pytest.mark.parametrize(
    "bad_line, column",
    [  # a line without its ]}, a line with a comma missing
        (
            '{"messages": [{"role": "user", "content": "hi"}',
            "Expecting ',' delimiter at column 48, the end of the line)",
        ),
        ('{"text": "a" "b"}', "Expecting ',' delimiter at column 14)"),
    ],
)
def test_a_line_that_is_not_json_is_named_with_the_column_in_that_line(tmp_path, tokenizer_path, bad_line, column):
    from llama.chat.format import chat_format_for
    from llama.training.data import read_examples

    tokenizer = Tokenizer(tokenizer_path)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "x"}\n' + bad_line + '\n{"text": "y"}\n')
    with pytest.raises(ValueError) as error:
        read_examples(str(data), tokenizer, chat_format_for(tokenizer), max_seq_len=16)
    assert str(error.value) == f"{data}, line 2: not valid JSON ({column}"


@pytest.mark.parametrize("format", ["llama2", "llama3"])
def test_a_dialog_trains_on_the_tokens_chat_completion_sends_and_learns_each_reply_with_its_end(
    format, tokenizer_path, llama3_tokenizer
):
    from llama.chat.format import chat_format_for
    from llama.training.data import encode_example

    tokenizer = Tokenizer(tokenizer_path if format == "llama2" else llama3_tokenizer[0])
    chat_format = chat_format_for(tokenizer)
    example = encode_example({"messages": DIALOG}, tokenizer, chat_format, "line 1")
    end = tokenizer.eos_id if format == "llama2" else tokenizer.special_tokens["<|eot_id|>"]
    previous_end = 0
    for reply in (3, 5):  # the prompt chat_completion sends for each reply, then the reply and its end
        prompt = chat_format.encode_dialog(DIALOG[: reply - 1])
        answer = tokenizer.encode(DIALOG[reply - 1]["content"], bos=False, eos=False)
        assert example.tokens[: len(prompt)] == prompt
        assert all(
            label == -100 for label in example.labels[previous_end : len(prompt)]
        )  # since the last reply: the prompt
        previous_end = len(prompt) + len(answer) + 1
        assert (
            example.tokens[len(prompt) : previous_end] == example.labels[len(prompt) : previous_end] == answer + [end]
        )
    assert sum(label != -100 for label in example.labels) == sum(
        len(tokenizer.encode(m["content"], bos=False, eos=False)) + 1 for m in DIALOG[2::2]
    )


def test_a_hugging_face_folder_fine_tunes_into_an_adapter_peft_reads_and_a_folder_transformers_reads(
    make_hf_checkpoint, tmp_path
):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    folder = make_hf_checkpoint(num_key_value_heads=4)
    data = write_jsonl(tmp_path / "pairs.jsonl", MEMORY)
    run(folder, data, tmp_path / "out", "--max_steps", "3", "--batch_size", "4", "--lr", "1e-2", "--merge")
    ours = Llama.build(folder, max_seq_len=64, max_batch_size=1, adapter_dir=str(tmp_path / "out"))
    tokens = torch.tensor([ours.tokenizer.encode(MEMORY[0]["prompt"], bos=True, eos=False)])
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder), str(tmp_path / "out")).eval()
    merged = LlamaForCausalLM.from_pretrained(str(tmp_path / "out" / "checkpoint")).eval()
    with torch.no_grad():
        logits = ours.model(tokens)
        assert torch.allclose(logits, peft_model(input_ids=tokens).logits, atol=1e-4)
        assert torch.allclose(logits, merged(input_ids=tokens).logits, atol=1e-4)
        assert not torch.allclose(logits, LlamaForCausalLM.from_pretrained(folder)(input_ids=tokens).logits, atol=1e-2)


def test_activation_checkpointing_changes_no_loss_and_a_finished_full_run_resumes(
    checkpoint, tokenizer_path, varied_data, tmp_path
):
    ckpt_dir, _ = checkpoint
    flags = [
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--max_seq_len",
        "96",
        "--lr",
        "1e-2",
        "--pack",
        "--method",
        "full",
    ]
    plain = run(
        ckpt_dir,
        varied_data,
        tmp_path / "plain",
        *flags[:1],
        "1",
        *flags[2:],
        "--save_every",
        "1",
        tokenizer_path=tokenizer_path,
    )
    plain = run(
        ckpt_dir, varied_data, tmp_path / "plain", *flags, "--resume", tokenizer_path=tokenizer_path
    )  # over its checkpoint
    checkpointed = run(
        ckpt_dir,
        varied_data,
        tmp_path / "checkpointed",
        *flags,
        "--activation_checkpointing",
        tokenizer_path=tokenizer_path,
    )
    assert [r["loss"] for r in checkpointed] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    assert (
        torch.load(tmp_path / "checkpointed" / "checkpoint" / "consolidated.00.pth", weights_only=True).keys()
        == torch.load(tmp_path / "plain" / "checkpoint" / "consolidated.00.pth", weights_only=True).keys()
    )


ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def test_a_dialog_in_a_folders_own_template_learns_each_reply_after_the_prompt_chat_completion_sends(
    make_hf_checkpoint,
):
    from llama.chat.format import TemplateChatFormat, chat_format_for
    from llama.checkpoints.hf import read_chat_template
    from llama.training.data import encode_example

    folder = Path(make_hf_checkpoint())
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": False,
        "chat_template": ZEPHYR_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(str(folder / "tokenizer.model"))
    chat_format = chat_format_for(tokenizer, read_chat_template(str(folder)))
    assert isinstance(chat_format, TemplateChatFormat)
    example = encode_example({"messages": DIALOG}, tokenizer, chat_format, "line 1")
    spans, start = [], None
    for i, label in enumerate(example.labels + [-100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            spans.append((start, i))
            start = None
    assert len(spans) == 2
    for (start, end), reply in zip(spans, (3, 5)):
        assert example.tokens[:start] == chat_format.encode_dialog(DIALOG[: reply - 1])  # what chat_completion sends
        learnt = example.tokens[start:end]
        assert (
            tokenizer.eos_id in learnt
            and tokenizer.decode(learnt[: learnt.index(tokenizer.eos_id)]).strip() == DIALOG[reply - 1]["content"]
        )
