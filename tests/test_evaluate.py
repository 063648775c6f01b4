"""python -m llama.evaluate: lm-evaluation-harness on this project's model gives the numbers of lm-eval's
own ``hf`` backend on the same weights (the checkpoint converted to a Hugging Face folder), on local
tasks of each kind: multiple choice, rolling perplexity, greedy generation. Offline: the tasks read
JSON Lines files beside their YAMLs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import stdlib_lines
from llama.convert import convert
from llama.evaluate import main
from llama.tokenizer import train_tokenizer

MAX_SEQ_LEN = 40  # the converted folder's max_position_embeddings: lm-eval's max_length on both sides

CHOICE_DOCS = [
    {"question": "import os\nimport", "choices": [" sys", " re", " json", " os.path"], "answer": 0},
    {"question": "def main():\n    return", "choices": [" None", " 0", " self"], "answer": 1},
    {"question": "for key, value in", "choices": [" items", " self.items()", " d.items():"], "answer": 2},
    {
        "question": "class Stack:\n    def __init__(self",
        "choices": ["):", ", items):", ", *args, **kwargs):"],
        "answer": 0,
    },
    # a context longer than the window, cut from the left as the hf backend cuts it
    {
        "question": "if x is None:\n    raise ValueError('x must be given')\n" * 3 + "elif",
        "choices": [" y", " x is None:"],
        "answer": 1,
    },
]
TEXT_DOCS = [  # scored in rolling windows of MAX_SEQ_LEN tokens: one window, then several
    {"text": "import os"},
    {
        "text": "def read(path):\n    with open(path) as f:\n        return f.read()\n\n\n"
        "class Reader:\n    def __init__(self, path):\n        self.path = path\n"
    },
    {
        "text": "x = [i * i for i in range(10) if i % 2]\n"
        "print(sum(x), len(x), max(x), min(x), sorted(x, reverse=True))\n" * 2
    },
]
GENERATION_DOCS = [
    {"prompt": "def add(a, b):\n    return", "answer": " a + b"},
    {"prompt": "import", "answer": " os"},
    {"prompt": "class Node:\n    def __init__(self, value):\n        self.value =", "answer": " value"},
]
TASKS = {
    "tiny_choice": (
        "choice.jsonl",
        CHOICE_DOCS,
        {
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
    ),
    "tiny_text": (
        "text.jsonl",
        TEXT_DOCS,
        {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        },
    ),
    "tiny_generation": (
        "generation.jsonl",
        GENERATION_DOCS,
        {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
    ),
}


def llama2_style_tokenizer(path: Path) -> None:
    """A 512-piece sentencepiece BPE with Llama 2's settings (no normalization, whitespace kept, a dummy
    space prepended, digits split, byte fallback), which transformers' LlamaTokenizer reads with the same
    ids (the session's tokenizer keeps sentencepiece's normalization, which transformers does not apply)."""
    path.write_bytes(train_tokenizer(stdlib_lines(5000), 512, add_dummy_prefix=True))


def write_tasks(folder: Path) -> Path:
    """Each task as a YAML file (JSON is YAML) beside its JSON Lines dataset."""
    for name, (data_file, docs, config) in TASKS.items():
        (folder / data_file).write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        dataset = {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / data_file)}},
            "test_split": "test",
        }
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **dataset, **config}))
    return folder


@pytest.fixture(scope="module")
def evaluations(make_checkpoint, tmp_path_factory):
    """(our results, our samples, hf's results, hf's samples): every task, both backends."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        ckpt_dir, _ = make_checkpoint(dtype=torch.float32, seed=3)
        llama2_style_tokenizer(Path(ckpt_dir) / "tokenizer.model")
        hf_dir = tmp_path_factory.mktemp("hf_eval")
        convert(ckpt_dir, str(hf_dir), "hf", dtype="float32", max_position_embeddings=MAX_SEQ_LEN)
        tasks = write_tasks(tmp_path_factory.mktemp("tasks"))
        out = tmp_path_factory.mktemp("out")
        names = ",".join(TASKS)
        main(
            [
                "--ckpt_dir",
                ckpt_dir,
                "--tasks",
                names,
                "--include_path",
                str(tasks),
                "--max_seq_len",
                str(MAX_SEQ_LEN),
                "--batch_size",
                "3",
                "--output_path",
                str(out),
                "--log_samples",
                "--dtype",
                "float32",
                "--device",
                "cpu",
            ]
        )
        (results_file,) = out.glob("*/results_*.json")
        ours = json.loads(results_file.read_text())
        our_samples = {
            name: [json.loads(line) for line in next(out.glob(f"*/samples_{name}_*.jsonl")).read_text().splitlines()]
            for name in TASKS
        }
        theirs = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={hf_dir},dtype=float32",
            tasks=list(TASKS),
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            batch_size=2,
            device="cpu",
            log_samples=True,
        )
    return ours, our_samples, theirs, theirs["samples"]


def metrics(results: dict, task: str) -> dict:
    return {key: value for key, value in results["results"][task].items() if "," in key and "stderr" not in key}


def test_multiple_choice_accuracies_equal_the_hf_backend(evaluations):
    ours, _, theirs, _ = evaluations
    assert metrics(ours, "tiny_choice") == metrics(theirs, "tiny_choice")


def test_multiple_choice_loglikelihoods_and_greedy_flags_equal_the_hf_backend(evaluations):
    _, our_samples, _, their_samples = evaluations
    for ours, theirs in zip(our_samples["tiny_choice"], their_samples["tiny_choice"], strict=True):
        assert [float(r[0][0]) for r in ours["resps"]] == pytest.approx([r[0][0] for r in theirs["resps"]], rel=1e-4)
        assert [r[0][1] == "True" for r in ours["resps"]] == [r[0][1] for r in theirs["resps"]]


def test_rolling_perplexities_equal_the_hf_backend(evaluations):
    ours, our_samples, theirs, their_samples = evaluations
    expected = metrics(theirs, "tiny_text")
    assert metrics(ours, "tiny_text") == pytest.approx(expected, rel=1e-4)
    assert all(math.isfinite(value) and value > 1 for value in expected.values())
    for mine, reference in zip(our_samples["tiny_text"], their_samples["tiny_text"], strict=True):
        assert float(mine["resps"][0][0]) == pytest.approx(reference["resps"][0][0], rel=1e-4)


def test_greedy_generations_equal_the_hf_backend(evaluations):
    ours, our_samples, theirs, their_samples = evaluations
    assert [s["resps"][0][0] for s in our_samples["tiny_generation"]] == [
        s["resps"][0][0] for s in their_samples["tiny_generation"]
    ]
    assert metrics(ours, "tiny_generation") == metrics(theirs, "tiny_generation")


def test_lm_evals_local_completions_on_the_server_gives_llama_evaluates_numbers(evaluations, make_checkpoint, tmp_path):
    """lm-eval's ``local-completions`` backend on ``python -m llama.server`` (prompts scored with ``echo``,
    ``logprobs`` 1 and ``max_tokens`` 1, 8 prompts a request on 3 slots) gives ``llama.evaluate``'s numbers on
    the multiple-choice and the rolling task. lm-eval's API backends keep ``max_length - 1`` tokens of a request
    and score rolling windows of ``max_length - 2`` tokens: a server whose context is 2 longer, given as
    ``max_length``, scores what ``llama.evaluate --max_seq_len`` scores."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from test_server import Server

    ours, our_samples, _, _ = evaluations
    ckpt_dir, _ = make_checkpoint(dtype=torch.float32, seed=3)
    llama2_style_tokenizer(Path(ckpt_dir) / "tokenizer.model")
    hf_dir = tmp_path / "hf"  # its tokenizer files are lm-eval's tokenizer
    convert(ckpt_dir, str(hf_dir), "hf", dtype="float32", max_position_embeddings=MAX_SEQ_LEN)
    (tmp_path / "tasks").mkdir()
    tasks, context = write_tasks(tmp_path / "tasks"), MAX_SEQ_LEN + 2
    command = [sys.executable, "-m", "llama.server", "--ckpt_dir", ckpt_dir, "--served_model_name", "tiny"]
    command += ["--max_seq_len", str(context), "--max_batch_size", "3", "--dtype", "float32", "--device", "cpu"]
    server = Server(command + ["--port", "0"], tmp_path / "log", name="tiny")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HF_DATASETS_OFFLINE", "1")
            patch.setenv("HF_HUB_OFFLINE", "1")
            theirs = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=f"model=tiny,base_url={server.url('/v1/completions')},tokenizer_backend=huggingface,"
                f"tokenizer={hf_dir},add_bos_token=True,max_length={context}",
                tasks=["tiny_choice", "tiny_text"],
                task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                batch_size=8,
                log_samples=True,
            )
    finally:
        server.kill()
    assert metrics(theirs, "tiny_choice") == metrics(ours, "tiny_choice")
    assert metrics(theirs, "tiny_text") == pytest.approx(metrics(ours, "tiny_text"), rel=1e-4)
    for mine, served in zip(our_samples["tiny_choice"], theirs["samples"]["tiny_choice"], strict=True):
        assert [float(r[0][0]) for r in mine["resps"]] == pytest.approx([r[0][0] for r in served["resps"]], rel=1e-4)
        assert [r[0][1] == "True" for r in mine["resps"]] == [r[0][1] for r in served["resps"]]
    for mine, served in zip(our_samples["tiny_text"], theirs["samples"]["tiny_text"], strict=True):
        assert float(mine["resps"][0][0]) == pytest.approx(served["resps"][0][0], rel=1e-4)


def test_without_lm_eval_the_command_names_the_extra_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(SystemExit) as exit:
        main(["--ckpt_dir", str(tmp_path), "--tasks", "hellaswag"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == 'error: lm-evaluation-harness is not installed: pip install -e ".[eval]"\n'


def test_two_processes_on_a_sharded_checkpoint_write_one_process_results_once(evaluations, make_checkpoint, tmp_path):
    """torchrun on a 2-shard checkpoint of the same weights: rank 0 alone prints the table and writes one
    results file, whose metrics are the single process's."""
    ours, _, _, _ = evaluations
    ckpt_dir, _ = make_checkpoint(n_shards=2, dtype=torch.float32, seed=3)
    llama2_style_tokenizer(Path(ckpt_dir) / "tokenizer.model")
    (tmp_path / "tasks").mkdir()
    tasks, out = write_tasks(tmp_path / "tasks"), tmp_path / "out"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "llama.evaluate",
    ]
    args = [
        "--ckpt_dir",
        ckpt_dir,
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        str(tasks),
        "--max_seq_len",
        str(MAX_SEQ_LEN),
        "--batch_size",
        "3",
        "--output_path",
        str(out),
        "--dtype",
        "float32",
        "--device",
        "cpu",
    ]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(torchrun + args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("tiny_choice") == 1, result.stdout  # one table
    (results_file,) = out.glob("*/results_*.json")
    theirs = json.loads(results_file.read_text())
    for task in TASKS:
        assert metrics(theirs, task) == pytest.approx(metrics(ours, task), rel=1e-5)


@pytest.mark.parametrize("flag", ["--quantize", "--kv_cache_dtype"])
def test_int8_weights_or_kv_cache_score_within_int8_rounding_of_the_float_model(
    evaluations, make_checkpoint, tmp_path, flag
):
    """``--quantize int8`` (the weights) or ``--kv_cache_dtype int8`` (the KV cache): each choice's
    log-likelihood within int8's rounding of the float32 model's (and not exactly it: int8 is used)."""
    _, our_samples, _, _ = evaluations
    ckpt_dir, _ = make_checkpoint(dtype=torch.float32, seed=3)
    llama2_style_tokenizer(Path(ckpt_dir) / "tokenizer.model")
    (tmp_path / "tasks").mkdir()
    tasks, out = write_tasks(tmp_path / "tasks"), tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        main(
            [
                "--ckpt_dir",
                ckpt_dir,
                "--tasks",
                "tiny_choice",
                "--include_path",
                str(tasks),
                "--max_seq_len",
                str(MAX_SEQ_LEN),
                "--batch_size",
                "3",
                "--output_path",
                str(out),
                "--log_samples",
                "--dtype",
                "float32",
                "--device",
                "cpu",
                flag,
                "int8",
            ]
        )
    quantized = [json.loads(line) for line in next(out.glob("*/samples_tiny_choice_*.jsonl")).read_text().splitlines()]
    exact = [float(r[0][0]) for s in our_samples["tiny_choice"] for r in s["resps"]]
    int8 = [float(r[0][0]) for s in quantized for r in s["resps"]]
    assert int8 == pytest.approx(exact, abs=0.05) and int8 != exact


def test_an_adapter_scores_as_the_hf_backend_scores_it_through_peft(evaluations, make_checkpoint, tmp_path):
    """``--adapter_dir`` (a fine-tuning's or post-training's OUT): each choice's log-likelihood equals lm-eval's
    hf backend with ``peft=`` the same adapter, and differs from the base's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llama.checkpoints.loader import load_model, read_model_args
    from llama.checkpoints.peft import write_adapter
    from llama.finetune import adapter_tensors
    from llama.layers.lora import LoraConfig, apply_lora
    from llama.options import EngineOptions
    from llama.tokenizer import Tokenizer

    _, our_samples, _, _ = evaluations
    ckpt_dir, _ = make_checkpoint(dtype=torch.float32, seed=3)
    llama2_style_tokenizer(Path(ckpt_dir) / "tokenizer.model")
    tokenizer_path = str(Path(ckpt_dir) / "tokenizer.model")
    args = read_model_args(ckpt_dir, Tokenizer(tokenizer_path), tokenizer_path, EngineOptions(1, MAX_SEQ_LEN))
    config = LoraConfig(rank=4, alpha=8.0)
    model = apply_lora(load_model(ckpt_dir, args, torch.device("cpu"), torch.float32), config)
    torch.manual_seed(4)
    for name, module in model.named_modules():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(module.weight, std=0.1)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_adapter(str(adapter), adapter_tensors(model), config, args, ckpt_dir)
    (tmp_path / "tasks").mkdir()
    tasks, out, hf_dir = write_tasks(tmp_path / "tasks"), tmp_path / "out", tmp_path / "hf"
    convert(ckpt_dir, str(hf_dir), "hf", dtype="float32", max_position_embeddings=MAX_SEQ_LEN)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        main(
            ["--ckpt_dir", ckpt_dir, "--adapter_dir", str(adapter), "--tasks", "tiny_choice", "--include_path"]
            + [str(tasks), "--max_seq_len", str(MAX_SEQ_LEN), "--batch_size", "3", "--output_path", str(out)]
            + ["--log_samples", "--dtype", "float32", "--device", "cpu"]
        )
        theirs = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={hf_dir},dtype=float32,peft={adapter}",
            tasks=["tiny_choice"],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            batch_size=2,
            device="cpu",
            log_samples=True,
        )
    ours = [json.loads(line) for line in next(out.glob("*/samples_tiny_choice_*.jsonl")).read_text().splitlines()]
    adapted = [float(r[0][0]) for s in ours for r in s["resps"]]
    reference = [float(r[0][0]) for s in theirs["samples"]["tiny_choice"] for r in s["resps"]]
    base = [float(r[0][0]) for s in our_samples["tiny_choice"] for r in s["resps"]]
    assert adapted == pytest.approx(reference, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(adapted, base)) > 1e-2
