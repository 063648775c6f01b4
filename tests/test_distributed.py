"""Model parallelism on CPU + gloo: any checkpoint on any number of processes gives the single-process
numbers, every rank returns the same tokens, and a failing rank ends the whole job with its error.

The multi-process tests start real processes (tests/distributed_worker.py), under torchrun or as plain
processes wired up through RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT the way an application that
launches its own processes does. Shard shapes of the published models are computed in this process on
the meta device, under torch's fake process group of the published world size.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import SMALL_PARAMS, to_transformers
from distributed_worker import POOLED_PROMPTS, PROMPTS, SAMPLE_SEED, SCORED_PAIRS, TOKENS, sample_after_build
from llama.distributed import BACKEND_ENV, resolve_backend
from llama.generation import Llama
from llama.layers import cpu_kernels
from llama.layers.parallel import check_world_size
from llama.model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "distributed_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SHARD_COUNTS = [1, 2, 4]
TIMEOUT = 90  # seconds; every job here ends in a few, so reaching this means a rank hung


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint):
    """The same weights saved as 1, 2 and 4 shards, and the full state."""
    dirs = {n: make_checkpoint(n_shards=n)[0] for n in SHARD_COUNTS}
    return dirs, make_checkpoint(n_shards=1)[1]


def run_single_process(ckpt_dir, tokenizer_path):
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32")
    after_build = sample_after_build(llama)
    greedy, _ = llama.generate(PROMPTS, max_gen_len=8, temperature=0)
    torch.manual_seed(SAMPLE_SEED)
    sampled, _ = llama.generate(PROMPTS, max_gen_len=8, temperature=1.0, top_p=0.95)
    return {"logits": llama.model.forward(TOKENS), "greedy": greedy, "sampled": sampled, "after_build": after_build}


@pytest.fixture(scope="module")
def single_process(checkpoints, tokenizer_path):
    dirs, _ = checkpoints
    return run_single_process(dirs[1], tokenizer_path)


@pytest.fixture(scope="module")
def transformers_logits(checkpoints):
    _, state = checkpoints
    with torch.no_grad():
        return to_transformers(state, SMALL_PARAMS, vocab_size=512)(TOKENS).logits


def run(args, env=None, timeout=TIMEOUT):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tokenizer_path, tmp_path_factory):
    """What each of 2 torchrun ranks computed for each checkpoint: {rank: {n_shards: results}}."""
    dirs, _ = checkpoints
    out = tmp_path_factory.mktemp("two_ranks")
    result = run(TORCHRUN + [WORKER, "generate", str(out), tokenizer_path] + [dirs[n] for n in SHARD_COUNTS])
    assert result.returncode == 0, result.stderr
    by_rank = {rank: torch.load(out / f"rank{rank}.pt") for rank in (0, 1)}
    return {rank: {n: results[dirs[n]] for n in SHARD_COUNTS} for rank, results in by_rank.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plain_processes(args, world_size=2, timeout=TIMEOUT):
    """Start one process per rank with torchrun's environment but no torchrun: nothing ends the other
    ranks when one fails. Returns each rank's (returncode, stderr); a rank still running after
    ``timeout`` fails the test as a hang."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        processes.append(
            subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outcomes = []
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=timeout)
            outcomes.append((process.returncode, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank was still running after {timeout} s: the job hung")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outcomes


# --- any checkpoint on any number of processes gives the single-process results -----------------


@pytest.mark.parametrize("n_shards", SHARD_COUNTS)
def test_two_ranks_give_the_single_process_logits(two_ranks, single_process, transformers_logits, n_shards):
    for rank in (0, 1):
        logits = two_ranks[rank][n_shards]["logits"]
        assert (logits - single_process["logits"]).abs().max().item() <= 1e-4
        assert (logits - transformers_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("n_shards", SHARD_COUNTS)
def test_two_ranks_return_the_single_process_greedy_tokens(two_ranks, single_process, n_shards):
    assert two_ranks[0][n_shards]["greedy"] == two_ranks[1][n_shards]["greedy"] == single_process["greedy"]


@pytest.mark.parametrize("n_shards", SHARD_COUNTS)
def test_ranks_with_different_random_generators_return_rank_0s_samples(two_ranks, single_process, n_shards):
    # rank r seeded SAMPLE_SEED + r before sampling; the single process, like rank 0, SAMPLE_SEED
    assert two_ranks[0][n_shards]["sampled"] == two_ranks[1][n_shards]["sampled"] == single_process["sampled"]


@pytest.mark.parametrize("n_shards", SHARD_COUNTS)
def test_the_same_seed_samples_the_same_text_on_two_ranks_as_in_one_process(two_ranks, single_process, n_shards):
    # each rank's weights have other shapes than the single process's: loading draws nothing from the generator
    assert (
        two_ranks[0][n_shards]["after_build"] == two_ranks[1][n_shards]["after_build"] == single_process["after_build"]
    )


def seconds_favouring(onednn: bool):
    """A stand-in for ``cpu_kernels._pass_seconds`` under which ``onednn`` (or BLAS) is always faster."""
    return lambda layers, x, timed_onednn: 1.0 if timed_onednn == onednn else 2.0


@pytest.mark.parametrize("kernel", ["onednn", "blas"])
def test_a_build_leaves_the_generator_as_its_seed_set_it_whatever_kernel_each_layer_gets(
    checkpoints, tokenizer_path, single_process, monkeypatch, tmp_path, kernel
):
    monkeypatch.setattr(cpu_kernels, "_chosen", {})  # every shape timed afresh, each won by ``kernel``
    monkeypatch.setenv("LLAMA_CACHE_DIR", str(tmp_path))  # (nor read from a choice an earlier test's run remembered)
    monkeypatch.setattr(cpu_kernels, "_pass_seconds", seconds_favouring(kernel == "onednn"))
    dirs, _ = checkpoints
    llama = Llama.build(
        dirs[1], tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32", seed=7
    )
    assert all(m.onednn == (kernel == "onednn") for m in llama.model.modules() if hasattr(m, "onednn"))
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(7).get_state())
    torch.manual_seed(1)  # the seed the single process was built with
    assert sample_after_build(llama) == single_process["after_build"]


@pytest.mark.parametrize("options", [{"quantize": "int8"}, {"dtype": "bfloat16"}, {"compile": True}])
def test_a_build_leaves_the_generator_as_its_seed_set_it_whatever_the_weights(checkpoints, tokenizer_path, options):
    dirs, _ = checkpoints
    Llama.build(dirs[2], tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", seed=7, **options)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(7).get_state())


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_engine_under_torchrun_admits_mid_decode_on_every_rank_and_followers_follow_rank_0(
    checkpoints, tokenizer_path, tmp_path, kv_cache_dtype
):
    """Each rank holds its heads of the pool (in int8: their values and scales), as the single process."""
    dirs, _ = checkpoints
    scenario = "engine" if kv_cache_dtype is None else f"engine_{kv_cache_dtype}"
    result = run(TORCHRUN + [WORKER, scenario, str(tmp_path), tokenizer_path, dirs[2]])
    assert result.returncode == 0, result.stderr
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    llama = Llama.build(
        dirs[1],
        tokenizer_path,
        max_seq_len=32,
        max_batch_size=2,
        device="cpu",
        dtype="float32",
        kv_cache_dtype=kv_cache_dtype,
    )
    alone = [llama.generate([prompt], max_gen_len=8, temperature=0, stop_tokens=[])[0][0] for prompt in PROMPTS]
    assert ranks[0]["every_rank"] == ranks[1]["every_rank"]  # rank 1's own draws were overruled
    assert ranks[0]["every_rank"][0] == alone[0]
    assert ranks[0]["served"] == [alone[1], alone[0]]
    # the pool of 3 blocks: a row was preempted and recomputed, then a prompt took a cached block, on both ranks alike
    assert (
        ranks[0]["preemptions"] == ranks[1]["preemptions"] > 0
        and ranks[0]["cached_tokens"] == ranks[1]["cached_tokens"] == 16
    )
    prompts = POOLED_PROMPTS + [POOLED_PROMPTS[0] + ranks[0]["pooled"][0][0][0][:15]]
    for prompt, *theirs in zip(prompts, ranks[0]["pooled"], ranks[1]["pooled"]):
        tokens, logprobs = llama.generate([prompt], max_gen_len=20, temperature=0, stop_tokens=[], logprobs=True)
        for their_tokens, their_logprobs in theirs:
            assert their_tokens == tokens
            assert torch.allclose(torch.tensor(their_logprobs), torch.tensor(logprobs), atol=1e-4)
    # scoring: every rank the single process's scores, the shared context's block computed once
    assert ranks[0]["scores"] == ranks[1]["scores"] and ranks[0]["scored_hit_tokens"] == 16
    alone = llama.engine.score(SCORED_PAIRS)
    for (logprobs, greedy), (expected, expected_greedy) in zip(ranks[0]["scores"], alone, strict=True):
        assert logprobs == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy


def test_speculative_decoding_under_torchrun_gives_every_rank_plain_greedy_tokens(
    checkpoints, tokenizer_path, tmp_path
):
    """Prompt lookup and an int8 self-draft, on a two-shard checkpoint split over two ranks: each rank
    accepts the same drafts and ends with the single process's plain greedy tokens and logprobs."""
    from distributed_worker import REPEATING_PROMPTS

    dirs, _ = checkpoints
    result = run(TORCHRUN + [WORKER, "speculate", str(tmp_path), tokenizer_path, dirs[2]])
    assert result.returncode == 0, result.stderr
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    llama = Llama.build(dirs[1], tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32")
    tokens, logprobs = llama.generate(REPEATING_PROMPTS, max_gen_len=12, temperature=0, logprobs=True, stop_tokens=[])
    for kind in ("lookup", "draft"):
        assert ranks[0][kind][0] == ranks[1][kind][0] == tokens
        for rank in ranks:
            for theirs, ours in zip(rank[kind][1], logprobs):
                assert torch.allclose(torch.tensor(theirs), torch.tensor(ours), atol=1e-4)


def test_one_process_loads_a_two_shard_checkpoint(checkpoints, tokenizer_path, single_process, transformers_logits):
    dirs, _ = checkpoints
    merged = run_single_process(dirs[2], tokenizer_path)
    assert (merged["logits"] - transformers_logits).abs().max().item() <= 1e-4
    assert merged["greedy"] == single_process["greedy"]
    assert merged["sampled"] == single_process["sampled"]


# --- the process group -------------------------------------------------------------------------


def test_backend_is_nccl_for_cuda_and_gloo_otherwise(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(torch.device("cuda", 0)) == "nccl"
    assert resolve_backend(torch.device("cpu")) == "gloo"
    assert resolve_backend(torch.device("mps")) == "gloo"


def test_backend_argument_overrides_the_environment_which_overrides_the_default(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "gloo")
    assert resolve_backend(torch.device("cuda", 0)) == "gloo"
    monkeypatch.setenv(BACKEND_ENV, "nccl")
    assert resolve_backend(torch.device("cpu"), backend="gloo") == "gloo"


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of \['nccl', 'gloo'\], got 'mpi'"):
        resolve_backend(torch.device("cpu"), backend="mpi")
    monkeypatch.setenv(BACKEND_ENV, "ncl")
    with pytest.raises(ValueError, match=r"\$LLAMA_DIST_BACKEND must be one of \['nccl', 'gloo'\], got 'ncl'"):
        resolve_backend(torch.device("cpu"))


def test_nccl_without_cuda_is_a_clear_error(checkpoints, tokenizer_path):
    dirs, _ = checkpoints
    with pytest.raises(ValueError, match=r"backend='nccl' needs a CUDA device .* the device is cpu .*; use 'gloo'"):
        Llama.build(dirs[1], tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", backend="nccl")


def test_a_group_the_application_created_is_used_and_left_alone(
    checkpoints, tokenizer_path, single_process, monkeypatch
):
    # torchrun's variables say 2 processes, but the application's own group (of 1) is the one to use
    dirs, _ = checkpoints
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        llama = Llama.build(dirs[2], tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32")
        greedy, _ = llama.generate(PROMPTS, max_gen_len=2, temperature=0)
        assert greedy == [tokens[:2] for tokens in single_process["greedy"]]
        assert dist.is_initialized() and dist.group.WORLD is group
    finally:
        dist.destroy_process_group()


def test_build_sends_stdout_to_dev_null_on_local_ranks_above_0_as_metas_does(checkpoints, tokenizer_path, monkeypatch):
    dirs, _ = checkpoints
    monkeypatch.setenv("LOCAL_RANK", "1")  # a second process on this machine, in a job of its own here
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    Llama.build(dirs[1], tokenizer_path, max_seq_len=8, max_batch_size=1, device="cpu", quiet_ranks=False)
    assert isinstance(sys.stdout, io.StringIO)
    Llama.build(dirs[1], tokenizer_path, max_seq_len=8, max_batch_size=1, device="cpu")
    assert sys.stdout.name == os.devnull


# --- world sizes and the published shard shapes ---------------------------------------------------


def published_args(name: str) -> ModelArgs:
    params = json.loads((ROOT / "params" / f"{name}.json").read_text())
    return ModelArgs.from_dict({**params, "vocab_size": 32000})


def rank_shapes(args: ModelArgs, group) -> dict:
    """The shapes of this rank's tensors split over ``group``, in the model the loader builds on the
    meta device to fill."""
    with torch.device("meta"):
        model = Transformer(args, group)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def test_llama_2_70b_shard_shapes_at_world_size_8(fake_world):
    fake_world(8)
    shapes = rank_shapes(published_args("llama-2-70b"), dist.group.WORLD)
    expected = {
        "tok_embeddings.weight": (32000, 1024),
        "output.weight": (4000, 8192),
        "norm.weight": (8192,),
        "layers.79.attention.wq.weight": (1024, 8192),
        "layers.79.attention.wk.weight": (128, 8192),
        "layers.79.attention.wv.weight": (128, 8192),
        "layers.79.attention.wo.weight": (8192, 1024),
        "layers.79.feed_forward.w1.weight": (3584, 8192),
        "layers.79.feed_forward.w2.weight": (8192, 3584),
        "layers.79.feed_forward.w3.weight": (3584, 8192),
        "layers.79.attention_norm.weight": (8192,),
        "layers.79.ffn_norm.weight": (8192,),
    }
    assert {key: shapes[key] for key in expected} == expected
    assert len(shapes) == 3 + 80 * 9


def test_llama_2_13b_shard_shapes_at_world_size_2(fake_world):
    fake_world(2)
    shapes = rank_shapes(published_args("llama-2-13b"), dist.group.WORLD)
    expected = {
        "tok_embeddings.weight": (32000, 2560),
        "output.weight": (16000, 5120),
        "norm.weight": (5120,),
        "layers.0.attention.wq.weight": (2560, 5120),
        "layers.0.attention.wk.weight": (2560, 5120),
        "layers.0.attention.wv.weight": (2560, 5120),
        "layers.0.attention.wo.weight": (5120, 2560),
        "layers.0.feed_forward.w1.weight": (6912, 5120),
        "layers.0.feed_forward.w2.weight": (5120, 6912),
        "layers.0.feed_forward.w3.weight": (6912, 5120),
    }
    assert {key: shapes[key] for key in expected} == expected
    assert len(shapes) == 3 + 40 * 9


def test_world_size_not_dividing_kv_heads_names_them_and_what_would_work(fake_world):
    fake_world(16)
    with pytest.raises(
        ValueError,
        match=r"over 16 model-parallel ranks or shards: n_kv_heads = 8 is not divisible by 16; "
        r".* would work: 1, 2, 4, 8$",
    ):
        rank_shapes(published_args("llama-2-70b"), dist.group.WORLD)


def test_world_size_not_dividing_several_sizes_names_each():
    args = ModelArgs.from_dict({**SMALL_PARAMS, "vocab_size": 512})
    with pytest.raises(
        ValueError,
        match=r"n_heads = 8, n_kv_heads = 4, dim = 64, ffn_hidden_dim = 224, vocab_size = 512 "
        r"are not divisible by 3; .* would work: 1, 2, 4$",
    ):
        check_world_size(args.split_sizes, 3)


# --- a failing rank ends the job with its error ---------------------------------------------------


@pytest.fixture
def corrupt_second_shard(checkpoints, tmp_path):
    """A 2-shard checkpoint whose consolidated.01.pth is truncated: only the rank reading it fails."""
    dirs, _ = checkpoints
    target = tmp_path / "ckpt"
    shutil.copytree(dirs[2], target)
    shard = target / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    return target


def test_corrupt_shard_on_one_rank_fails_every_rank_with_its_error(corrupt_second_shard, tokenizer_path, tmp_path):
    (rc0, err0), (rc1, err1) = run_plain_processes(
        [sys.executable, WORKER, "build", str(tmp_path), tokenizer_path, str(corrupt_second_shard)]
    )
    message = f"cannot load checkpoint shard {corrupt_second_shard / 'consolidated.01.pth'}"
    assert rc1 != 0 and f"ValueError: {message}" in err1
    assert rc0 != 0 and f"RankFailedError: rank 1 failed with ValueError: {message}" in err0


def test_missing_shard_on_one_rank_fails_every_rank_with_its_error(checkpoints, tokenizer_path, tmp_path):
    dirs, _ = checkpoints
    incomplete = tmp_path / "incomplete"
    shutil.copytree(dirs[2], incomplete)
    (incomplete / "consolidated.00.pth").unlink()
    # rank 0 is given the good checkpoint, rank 1 a copy that lacks a shard
    (rc0, err0), (rc1, err1) = run_plain_processes(
        [sys.executable, WORKER, "build", str(tmp_path), tokenizer_path, dirs[2], str(incomplete)]
    )
    message = f"checkpoint directory {incomplete} has 1 shard but lacks consolidated.00.pth"
    assert rc1 != 0 and f"FileNotFoundError: {message}" in err1
    assert rc0 != 0 and f"RankFailedError: rank 1 failed with FileNotFoundError: {message}" in err0


def test_generate_arguments_that_differ_between_ranks_fail_on_every_rank(checkpoints, tokenizer_path, tmp_path):
    dirs, _ = checkpoints
    outcomes = run_plain_processes([sys.executable, WORKER, "bad_args", str(tmp_path), tokenizer_path, dirs[2]])
    assert [rc for rc, _ in outcomes] == [0, 0], outcomes
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    bad = "ValueError: max_gen_len must be a non-negative integer, got -1"
    assert rank1["bad_on_rank1"] == bad
    assert rank0["bad_on_rank1"] == f"RankFailedError: rank 1 failed with {bad}"
    different = "ValueError: rank(s) [1] were given different arguments from rank 0; every rank must make the same call"
    assert rank0["different_prompts"] == rank1["different_prompts"] == different
    assert rank0["then_correct"] == rank1["then_correct"] == "ok"


def test_torchrun_ends_the_job_when_one_rank_raises_outside_llama(tmp_path, tokenizer_path):
    # rank 0 would sleep for a minute: torchrun must end it as soon as rank 1 fails
    result = run(TORCHRUN + [WORKER, "rank1_raises", str(tmp_path), tokenizer_path], timeout=45)
    assert result.returncode != 0
    assert "RuntimeError: rank 1 gave up before any collective" in result.stderr


# --- the example script ---------------------------------------------------------------------------


def example_args(ckpt_dir, tokenizer_path):
    return [
        "example_text_completion.py",
        "--ckpt_dir",
        str(ckpt_dir),
        "--tokenizer_path",
        tokenizer_path,
        "--max_gen_len",
        "4",
        "--prompts",
        "['import sys']",
        "--device",
        "cpu",
    ]


def test_example_under_torchrun_on_two_processes_prints_once(checkpoints, tokenizer_path):
    dirs, _ = checkpoints
    result = run(TORCHRUN + example_args(dirs[2], tokenizer_path))
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.count(f"Loaded {dirs[2]} (tokenizer: {tokenizer_path}) on cpu with 1 thread(s)") == 1
    )  # torchrun's OMP_NUM_THREADS=1
    assert result.stdout.count("import sys\n> ") == 1


def test_example_without_torchrun_loads_a_two_shard_checkpoint(checkpoints, tokenizer_path):
    dirs, _ = checkpoints
    result = run([sys.executable] + example_args(dirs[2], tokenizer_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("import sys\n> ") == 1


def test_example_under_torchrun_with_a_corrupt_shard_exits_with_its_error(corrupt_second_shard, tokenizer_path):
    result = run(TORCHRUN + example_args(corrupt_second_shard, tokenizer_path))
    assert result.returncode != 0
    assert f"cannot load checkpoint shard {corrupt_second_shard / 'consolidated.01.pth'}" in result.stderr


def test_example_under_torchrun_with_a_bad_world_size_prints_one_error_line(make_checkpoint, tokenizer_path):
    three_heads, _ = make_checkpoint(params={**SMALL_PARAMS, "dim": 48, "n_heads": 3, "n_kv_heads": 3})
    result = run(TORCHRUN + example_args(three_heads, tokenizer_path))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot split the model over 2 model-parallel ranks")
    assert "Traceback" not in result.stderr.split("error: ")[0]  # no rank printed its traceback before it
