"""LoRA adapters served per request: each row computes with its own adapter, or none, beside the others
in one batch, eager and compiled, and gives what the model with that one adapter merged into its weights
gives (``adapter_dir``); peft on transformers is the independent reference for one of them."""

import functools
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from conftest import SMALL_PARAMS, to_transformers
from llama.checkpoints.loader import load_model
from llama.checkpoints.peft import write_adapter
from llama.finetune import adapter_tensors
from llama.generation import Llama
from llama.layers.lora import TARGET_SETS, LoraConfig, apply_lora
from llama.model import ModelArgs
from llama.options import GenerationOptions

ADAPTER_SHAPES = {  # name: (rank, targets); ranks and targets differ, so the packed columns do too
    "attention": (4, ("wq", "wk", "wv", "wo")),
    "all": (8, TARGET_SETS["all"]),
    "mlp": (2, ("w1", "w2", "w3")),
    "queries": (16, ("wq",)),
}
PROMPTS = ["import os\n", "def f(x):\n    return x + 1", "class A:", "for i in range(10):", "while True:\n"]
ROWS = list(zip(PROMPTS, [*ADAPTER_SHAPES, None]))  # four adapters and the base
GREEDY = dict(max_gen_len=12, temperature=0, stop_tokens=[], logprobs=True)
SIZES = dict(max_seq_len=64, max_batch_size=5)


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> Dict[str, str]:
    """Four peft adapters of the session's checkpoint, as fine-tuning writes them, B random (an adapter
    fresh from training is the base), by name."""
    ckpt_dir, _ = checkpoint
    return {
        name: write_random_adapter(tmp_path_factory.mktemp(f"adapter-{name}"), ckpt_dir, rank, targets, seed)
        for seed, (name, (rank, targets)) in enumerate(ADAPTER_SHAPES.items())
    }


def write_random_adapter(folder: Path, ckpt_dir: str, rank: int, targets: tuple, seed: int) -> str:
    """A peft adapter of ``ckpt_dir``'s model (SMALL_PARAMS) as fine-tuning writes it, of ``rank`` on ``targets``,
    B drawn from ``seed`` (fresh from training B is zero: the adapter would be the base); its folder."""
    args = ModelArgs.from_dict({**SMALL_PARAMS, "vocab_size": 512})
    config = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    model = apply_lora(load_model(ckpt_dir, args, torch.device("cpu"), torch.float32), config)
    torch.manual_seed(seed)
    for module_name, module in model.named_modules():
        if module_name.endswith("lora_B"):
            torch.nn.init.normal_(module.weight, std=0.5)
    write_adapter(str(folder), adapter_tensors(model), config, args, ckpt_dir)
    return str(folder)


def encode(llama: Llama, text: str) -> List[int]:
    return llama.tokenizer.encode(text, bos=True, eos=False)


@pytest.fixture(scope="module")
def merged(make_llama, adapters) -> Dict[Optional[str], Llama]:
    """Each adapter merged into the weights as they load (and the base, None), by name."""
    return {name: make_llama(**SIZES, adapter_dir=adapters.get(name)) for name in [*ADAPTER_SHAPES, None]}


@pytest.fixture(scope="module")
def expected(merged) -> Dict[tuple, tuple]:
    """(tokens, logprobs) of each row of ``ROWS`` alone, on its adapter merged, by (prompt, adapter)."""
    results = {}
    for prompt, name in ROWS:
        llama = merged[name]
        (tokens,), (logprobs,) = llama.generate([encode(llama, prompt)], **GREEDY)
        results[prompt, name] = tokens, logprobs
    base = merged[None]
    for name in ADAPTER_SHAPES:  # each adapter changes the model: its rows could not pass as the base's
        prompt = ROWS[list(ADAPTER_SHAPES).index(name)][0]
        (_,), (base_logprobs,) = base.generate([encode(base, prompt)], **GREEDY)
        assert max(abs(a - b) for a, b in zip(results[prompt, name][1], base_logprobs)) > 1e-2
    return results


@pytest.fixture(scope="module")
def served(make_llama, adapters) -> Llama:
    return make_llama(**SIZES, adapters=adapters)


def assert_equal(result, expected_result, what: str) -> None:
    (tokens, logprobs), (expected_tokens, expected_logprobs) = result, expected_result
    assert tokens == expected_tokens, what
    assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs)) < 1e-4, what


def run_batch(llama: Llama, rows) -> List[tuple]:
    """Every row a request of its own, all submitted before the first step: one batch."""
    engine = llama.engine
    requests = [
        engine.submit([encode(llama, prompt)], GenerationOptions(**GREEDY, adapter=name)) for prompt, name in rows
    ]
    while not all(request.done for request in requests):
        engine.step()
    return [(request.tokens[0], request.logprobs[0]) for request in requests]


def test_each_adapter_row_alone_gives_its_adapter_merged(served, expected):
    for prompt, name in ROWS:
        (tokens,), (logprobs,) = served.generate([encode(served, prompt)], adapter=name, **GREEDY)
        assert_equal((tokens, logprobs), expected[prompt, name], f"{name} alone")


def test_rows_of_four_adapters_and_the_base_in_one_batch_each_give_their_adapter_merged(served, expected):
    for (prompt, name), result in zip(ROWS, run_batch(served, ROWS)):
        assert_equal(result, expected[prompt, name], f"{name} in a batch")
    assert served.engine.adapters.columns == 32  # ranks 4 + 8 + 2 + 16 packed, no padding to max_lora_rank


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_rows_of_four_adapters_and_the_base_give_their_adapter_merged_and_no_mix_compiles(
    make_llama, adapters, expected, monkeypatch
):
    """Traced by dynamo's eager backend (the graphs inductor would compile, counted the same): after
    warming up, every mix of rows (all, one, some with adapters, coming and going) runs in the graphs."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    compiled = make_llama(**SIZES, adapters=adapters, compile=True)
    for (prompt, name), result in zip(ROWS, run_batch(compiled, ROWS)):  # every adapter loaded on the device
        assert_equal(result, expected[prompt, name], f"{name} compiled, in a batch")
    compiled.engine.warm_up()  # for the packed columns of the four
    graphs = unique_graphs()
    for rows in (ROWS[4:], ROWS[1:2], ROWS[::2], ROWS[::-1]):
        for (prompt, name), result in zip(rows, run_batch(compiled, rows)):
            assert_equal(result, expected[prompt, name], f"{name} compiled")
    assert unique_graphs() == graphs


def test_an_adapter_row_gives_the_logprobs_of_peft_on_transformers(served, adapters, checkpoint):
    from peft import PeftModel

    _, state = checkpoint
    reference = PeftModel.from_pretrained(to_transformers(state, SMALL_PARAMS, 512), adapters["all"]).eval()
    prompt = encode(served, PROMPTS[1])
    (tokens,), (logprobs,) = served.generate([prompt], adapter="all", **GREEDY)
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    theirs = torch.log_softmax(logits.float(), dim=-1)
    assert tokens == theirs.argmax(dim=-1).tolist()
    assert torch.allclose(torch.tensor(logprobs), theirs.gather(1, torch.tensor(tokens)[:, None])[:, 0], atol=1e-4)


def test_the_prefix_cache_shares_blocks_within_an_adapter_and_never_across(served, merged):
    prompt = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
    tokens = encode(served, prompt)
    assert len(tokens) > 2 * served.engine.options.block_size
    cached = []
    for name in [None, "all", "attention", "all", None]:
        request = served.start([tokens], "prompt_tokens", adapter=name, **GREEDY)
        for _ in served.engine.run_until_done(request):
            pass
        cached.append(request.cached_tokens)
        (expected_tokens,), _ = merged[name].generate([tokens], **GREEDY)
        assert request.tokens[0] == expected_tokens, name
    full = 2 * served.engine.options.block_size
    assert cached == [0, 0, 0, full, full]


def test_prompt_lookup_and_json_object_on_an_adapter_row_give_the_plain_paths_tokens(served, merged):
    prompt = [encode(served, "x = [1, 2, 3, 1, 2, 3, 1, 2")]
    (plain,), _ = served.generate(prompt, adapter="all", **GREEDY)
    (speculated,), _ = served.generate(prompt, adapter="all", speculate="lookup", speculate_k=3, **GREEDY)
    assert speculated == plain
    structured = dict(max_gen_len=24, temperature=0, json_object=True)
    (ours,), _ = served.generate(prompt, adapter="mlp", **structured)
    (theirs,), _ = merged["mlp"].generate(prompt, **structured)
    assert ours == theirs


def test_rows_of_more_adapters_than_max_loras_wait_for_an_unused_one_and_give_their_adapter_merged(
    make_llama, adapters, expected
):
    llama = make_llama(**SIZES, adapters=adapters, max_loras=2)
    engine = llama.engine
    requests = [
        engine.submit([encode(llama, prompt)], GenerationOptions(**GREEDY, adapter=name)) for prompt, name in ROWS
    ]
    engine.step()
    assert engine.running_slots == 2 and engine.queue_length == 3  # two adapters on the device; the third waits
    while not all(request.done for request in requests):
        engine.step()
        assert sum(name is not None for name in engine.adapters.resident) <= 2
    for (prompt, name), request in zip(ROWS, requests):
        assert_equal((request.tokens[0], request.logprobs[0]), expected[prompt, name], f"{name}, two on the device")


def test_an_unknown_adapter_a_model_without_adapters_and_a_rank_over_max_lora_rank_are_one_line_errors(
    served, merged, make_llama, adapters
):
    with pytest.raises(ValueError, match="adapter 'nope' is not loaded; the loaded adapters: 'attention', 'all'"):
        served.generate([[1, 2]], adapter="nope", max_gen_len=1)
    with pytest.raises(ValueError, match="serves no adapters per request; build it with"):
        merged[None].text_completion(["x"], adapter="all", max_gen_len=1)
    with pytest.raises(ValueError, match=r"'queries' .* has rank 16, over max_lora_rank=8: .* max_lora_rank >= 16"):
        make_llama(**SIZES, adapters={"queries": adapters["queries"]}, max_lora_rank=8)


# --- loaded and unloaded while serving ----------------------------------------------------------


def test_adapters_loaded_at_runtime_give_their_adapter_merged_and_an_unloaded_one_lets_its_rows_finish(
    make_llama, adapters, expected
):
    llama = make_llama(**SIZES, adapters={}, max_loras=2)  # none yet
    for name in ADAPTER_SHAPES:
        llama.load_adapter(name, adapters[name])
    for (prompt, name), result in zip(ROWS, run_batch(llama, ROWS)):
        assert_equal(result, expected[prompt, name], f"{name} loaded at runtime")
    with pytest.raises(ValueError, match="an adapter named 'all' is already loaded"):
        llama.load_adapter("all", adapters["all"])

    engine, (prompt, name) = llama.engine, ROWS[1]
    running = engine.submit([encode(llama, prompt)], GenerationOptions(**GREEDY, adapter=name))
    engine.step()
    gone = engine.unload_adapter(name)
    with pytest.raises(ValueError, match="adapter 'all' is not loaded; the loaded adapters: 'attention', 'mlp'"):
        engine.submit([encode(llama, prompt)], GenerationOptions(**GREEDY, adapter=name))
    while not running.done:
        assert not gone.is_set()
        engine.step()
    engine.step()
    assert gone.is_set() and "all" not in engine.adapters.resident
    assert_equal((running.tokens[0], running.logprobs[0]), expected[prompt, name], "finished while unloading")

    llama.load_adapter("all", adapters["all"])  # the name is free again
    for (prompt, name), result in zip(ROWS, run_batch(llama, ROWS)):
        assert_equal(result, expected[prompt, name], f"{name} after an unload and a load")
    with pytest.raises(ValueError, match="no adapter named 'nope' is loaded"):
        llama.unload_adapter("nope")


def test_an_adapter_of_another_model_or_with_a_target_the_model_lacks_is_refused_at_load(
    served, make_checkpoint, adapters, tmp_path
):
    from safetensors.torch import load_file, save_file

    ckpt_dir, _ = make_checkpoint(params={**SMALL_PARAMS, "dim": 128})
    args = ModelArgs.from_dict({**SMALL_PARAMS, "dim": 128, "vocab_size": 512})
    config = LoraConfig(rank=2, alpha=4.0, targets=("wq",))
    other = apply_lora(load_model(ckpt_dir, args, torch.device("cpu"), torch.float32), config)
    (tmp_path / "other").mkdir()
    write_adapter(str(tmp_path / "other"), adapter_tensors(other), config, args, ckpt_dir)
    with pytest.raises(ValueError, match=r"lora_A of layers.0.attention.wq has shape \(2, 128\), expected \(2, 64\)"):
        served.load_adapter("other", str(tmp_path / "other"))

    head = tmp_path / "head"
    head.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (head / name).write_bytes((Path(adapters["mlp"]) / name).read_bytes())
    tensors = load_file(str(head / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
    save_file(tensors, str(head / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected key 'base_model.model.lm_head.lora_A.weight'"):
        served.load_adapter("head", str(head))

    assert served.engine.adapters.names == list(ADAPTER_SHAPES)  # neither was loaded


def test_under_torchrun_every_rank_serves_its_slice_of_each_adapter_loaded_at_build_at_runtime_or_by_rank_0(
    make_checkpoint, tokenizer_path, tmp_path
):
    """Two processes splitting a two-shard checkpoint (tests/distributed_worker.py's "adapters"): each row
    gives the single process's tokens and logprobs with its adapter merged, on both ranks."""
    import subprocess
    import sys

    from distributed_worker import ADAPTER_OPTIONS, ADAPTER_ROWS, PROMPTS

    ckpt_dir, _ = make_checkpoint(n_shards=2)
    folders = []
    for seed, (rank, targets) in enumerate([(4, TARGET_SETS["all"]), (2, ("wk", "wo", "w2")), (8, ("w1", "w3"))]):
        (tmp_path / f"a{seed}").mkdir()
        folders.append(write_random_adapter(tmp_path / f"a{seed}", ckpt_dir, rank, targets, seed))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    worker = str(Path(__file__).parent / "distributed_worker.py")
    command = [*torchrun, worker, "adapters", str(tmp_path), tokenizer_path, ckpt_dir, *folders]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]

    def alone(prompt, adapter_dir) -> tuple:
        llama = Llama.build(ckpt_dir, tokenizer_path, 32, 1, device="cpu", dtype="float32", adapter_dir=adapter_dir)
        (tokens,), (logprobs,) = llama.generate([prompt], **ADAPTER_OPTIONS)
        return tokens, logprobs

    expected = [alone(prompt, None if name is None else folders[int(name[1])]) for prompt, name in ADAPTER_ROWS]
    for rank in ranks:
        for result, reference, (_, name) in zip(rank["batch"], expected, ADAPTER_ROWS):
            assert_equal(result, reference, f"{name} under torchrun")
        assert_equal(rank["loaded"][0], alone(PROMPTS[1], folders[2]), "loaded at runtime under torchrun")
        assert_equal(rank["loaded"][1], expected[0], "beside it")
        assert rank["names"] == ["a1", "a2"]
    assert_equal(ranks[0]["followed"][0], expected[0], "loaded by rank 0 alone, the other following")
