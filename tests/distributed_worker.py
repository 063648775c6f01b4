"""One rank of the multi-process tests in test_distributed.py.

Run under torchrun, or as plain processes given RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (the way an application that launches its own processes runs them):

    python tests/distributed_worker.py SCENARIO OUT_DIR TOKENIZER_PATH CKPT_DIR...

Scenarios:
    generate     for each checkpoint: tokens of PROMPTS sampled first thing after Llama.build (from the
                 generator as the build's seed left it), logits of TOKENS, greedy and sampled tokens of
                 PROMPTS, saved to OUT_DIR/rank<R>.pt. Before the second sampling every rank seeds its
                 generator differently, so equal samples on all ranks come from the broadcast, not from luck.
    build        Llama.build, nothing else (a failing rank raises out of it); rank r loads
                 CKPT_DIR number r % (number of CKPT_DIRs), so ranks can be given different ones.
    bad_args     generate called with a bad argument on rank 1 only, then with different (valid) prompts
                 on each rank, then correctly: each outcome saved to OUT_DIR/rank<R>.pt.
    rank1_raises rank 1 raises before any collective while rank 0 waits for a minute.
    llama3       for each Llama 3 checkpoint (TOKENIZER_PATH "-": the folder's own tokenizer): logits of
                 the first of llama3_inputs, greedy tokens of the second, saved as for generate.
    engine       the decoding engine, its KV cache pool 3 blocks of 16: a request admitted while another
                 decodes, then two rows outgrowing the pool together (one is preempted) and a prompt
                 whose first block is cached, then SCORED_PAIRS scored (a context's block shared): first
                 every rank submits the same requests (generate's way), then rank 0 alone submits and
                 runs them while the others follow its plans (a server's way) until it shuts down; the
                 tokens and scores saved to OUT_DIR/rank<R>.pt.
    engine_int8  the same, the pool stored in int8 (kv_cache_dtype="int8").
    speculate    greedy tokens and logprobs of REPEATING_PROMPTS with prompt lookup and with the
                 model's own int8 weights as the draft, saved as for generate.
    adapters     CKPT_DIR then three LoRA adapters' folders, served per request (at most two on the device):
                 greedy tokens and logprobs of ADAPTER_ROWS in one batch, then of a row of the third adapter
                 loaded at runtime beside one of the first (every rank loads it), then, the first unloaded,
                 of a row of the first again under another name, loaded and run by rank 0 alone while the
                 others follow its plans (a server's way); saved as for generate.
"""

import dataclasses
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llama.generation import Llama
from llama.options import GenerationOptions

TOKENS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
PROMPTS = [[1, 17, 300, 42, 99], [1, 250, 7]]
SAMPLE_SEED = 123
POOLED_PROMPTS = [PROMPTS[0] + [5, 6, 7], PROMPTS[1]]
SCORED_PAIRS = [([1] + list(range(100, 119)), [5, 6]), (PROMPTS[1], [9, 10]), ([1] + list(range(100, 119)), [7])]


LLAMA3_MAX_SEQ_LEN = 96


def build(ckpt_dir: str, tokenizer_path: str, **options) -> Llama:
    return Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32", **options
    )


def sample_after_build(llama: Llama):
    """Tokens of PROMPTS sampled from the global generator in the state ``Llama.build`` left it in."""
    return llama.generate(PROMPTS, max_gen_len=8, temperature=0.8, top_p=0.9)[0]


def llama3_inputs(tokenizer):
    """(2, 80) random tokens, and two prompts, the first of 40 tokens: both pass the 32-token original
    context of test_llama3's factor-32 model."""
    tokens = torch.randint(0, tokenizer.n_words, (2, 80), generator=torch.Generator().manual_seed(3))
    text = "def add(a, b):\n    return a + b\n" * 6
    return tokens, [tokenizer.encode(text, bos=True, eos=False)[:40], [tokenizer.bos_id, 17, 300]]


def llama3(tokenizer_path: str, ckpt_dirs) -> dict:
    results = {}
    for ckpt_dir in ckpt_dirs:
        llama = Llama.build(ckpt_dir, max_seq_len=LLAMA3_MAX_SEQ_LEN, max_batch_size=2, device="cpu", dtype="float32")
        tokens, prompts = llama3_inputs(llama.tokenizer)
        greedy, _ = llama.generate(prompts, max_gen_len=8, temperature=0)
        results[ckpt_dir] = {"logits": llama.model.forward(tokens), "greedy": greedy}
    return results


def outcome(call) -> str:
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


def generate(tokenizer_path: str, ckpt_dirs) -> dict:
    results = {}
    for ckpt_dir in ckpt_dirs:
        llama = build(ckpt_dir, tokenizer_path)
        after_build = sample_after_build(llama)
        greedy, _ = llama.generate(PROMPTS, max_gen_len=8, temperature=0)
        torch.manual_seed(SAMPLE_SEED + dist.get_rank())
        sampled, _ = llama.generate(PROMPTS, max_gen_len=8, temperature=1.0, top_p=0.95)
        results[ckpt_dir] = {
            "logits": llama.model.forward(TOKENS),
            "greedy": greedy,
            "sampled": sampled,
            "after_build": after_build,
        }
    return results


def bad_args(tokenizer_path: str, ckpt_dirs) -> dict:
    llama, rank = build(ckpt_dirs[0], tokenizer_path), dist.get_rank()
    return {
        "bad_on_rank1": outcome(lambda: llama.generate(PROMPTS, max_gen_len=-1 if rank == 1 else 4)),
        "different_prompts": outcome(lambda: llama.generate([PROMPTS[rank]], max_gen_len=4)),
        "then_correct": outcome(lambda: llama.generate(PROMPTS, max_gen_len=4)),
    }


def engine(tokenizer_path: str, ckpt_dirs, kv_cache_dtype=None) -> dict:
    engine = build(ckpt_dirs[0], tokenizer_path, kv_cache_tokens=48, kv_cache_dtype=kv_cache_dtype).engine
    rank = dist.get_rank()
    greedy = GenerationOptions(max_gen_len=8, temperature=0, stop_tokens=[])
    torch.manual_seed(SAMPLE_SEED + rank)  # equal samples on every rank come from rank 0's broadcast
    first = engine.submit([PROMPTS[0]], greedy)
    engine.step()
    engine.step()
    second = engine.submit([PROMPTS[1]], GenerationOptions(max_gen_len=8, temperature=1.0, stop_tokens=[]))
    while not (first.done and second.done):
        engine.step()
    longer = GenerationOptions(max_gen_len=20, temperature=0, stop_tokens=[], logprobs=True)
    pooled = [engine.submit([prompt], longer) for prompt in POOLED_PROMPTS]  # 2 blocks each, 3 in the pool
    while not all(request.done for request in pooled):
        engine.step()
    cached = engine.submit([POOLED_PROMPTS[0] + pooled[0].tokens[0][:15]], longer)  # its first block is cached
    while not cached.done:
        engine.step()
    results = {
        "every_rank": [first.tokens[0], second.tokens[0]],
        "served": None,
        "pooled": [r.results() for r in pooled + [cached]],
        "preemptions": engine.preemptions,
        "cached_tokens": cached.cached_tokens,
    }
    hits = engine.pool_use()["hit_tokens"]
    results["scores"] = engine.score(SCORED_PAIRS)
    results["scored_hit_tokens"] = engine.pool_use()["hit_tokens"] - hits  # rank 0's block manager
    if rank == 0:
        first = engine.submit([PROMPTS[1]], greedy)
        engine.step()
        second = engine.submit([PROMPTS[0]], greedy)
        while not (first.done and second.done):
            engine.step()
        engine.options = dataclasses.replace(engine.options, heartbeat_seconds=0.2)
        threading.Timer(1.0, engine.stop).start()
        engine.run()  # idle: heartbeats for a second, then tells the followers to shut down
        results["served"] = [first.tokens[0], second.tokens[0]]
    else:
        engine.follow()
    return results


REPEATING_PROMPTS = [[1] + [17, 300, 42, 99] * 3, [1, 250, 7, 250, 7]]  # something for prompt lookup to find


def speculate(tokenizer_path: str, ckpt_dirs) -> dict:
    results = {}
    for kind, extra in (("lookup", {}), ("draft", {"draft_ckpt_dir": ckpt_dirs[0], "draft_quantize": "int8"})):
        llama = Llama.build(
            ckpt_dirs[0], tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32", **extra
        )
        results[kind] = llama.generate(
            REPEATING_PROMPTS,
            max_gen_len=12,
            temperature=0,
            logprobs=True,
            stop_tokens=[],
            speculate=kind,
            speculate_k=3,
        )
    return results


ADAPTER_ROWS = [(PROMPTS[0], "a0"), (PROMPTS[1], "a1"), (PROMPTS[0], None)]
ADAPTER_OPTIONS = dict(max_gen_len=8, temperature=0, stop_tokens=[], logprobs=True)


def adapter_batch(engine, rows) -> list:
    """Each (prompt, adapter) a request of its own, in one batch: their (tokens, logprobs)."""
    requests = [engine.submit([prompt], GenerationOptions(**ADAPTER_OPTIONS, adapter=name)) for prompt, name in rows]
    while not all(request.done for request in requests):
        engine.step()
    return [(request.tokens[0], request.logprobs[0]) for request in requests]


def adapters(tokenizer_path: str, paths) -> dict:
    ckpt_dir, folders = paths[0], paths[1:]
    llama = Llama.build(
        ckpt_dir,
        tokenizer_path,
        max_seq_len=32,
        max_batch_size=3,
        device="cpu",
        dtype="float32",
        adapters={"a0": folders[0], "a1": folders[1]},
        max_loras=2,
    )
    engine = llama.engine
    results = {"batch": adapter_batch(engine, ADAPTER_ROWS)}
    llama.load_adapter("a2", folders[2])  # the device's two indices are taken: the least recently used leaves
    results["loaded"] = adapter_batch(engine, [(PROMPTS[1], "a2"), (PROMPTS[0], "a0")])
    llama.unload_adapter("a0")
    results["names"] = engine.adapters.names
    if dist.get_rank() == 0:
        engine.load_adapter("again", folders[0])  # the followers read it when the plan says so
        results["followed"] = adapter_batch(engine, [(PROMPTS[0], "again")])
        engine.stop()
        engine.run()
    else:
        engine.follow()
    return results


def main(scenario: str, out_dir: str, tokenizer_path: str, *ckpt_dirs: str) -> None:
    if scenario == "rank1_raises":
        if os.environ["RANK"] == "1":
            raise RuntimeError("rank 1 gave up before any collective")
        time.sleep(60)
    elif scenario == "build":
        build(ckpt_dirs[int(os.environ["RANK"]) % len(ckpt_dirs)], tokenizer_path)
    else:
        results = {
            "generate": generate,
            "bad_args": bad_args,
            "llama3": llama3,
            "engine": engine,
            "engine_int8": lambda tokenizer_path, ckpt_dirs: engine(tokenizer_path, ckpt_dirs, "int8"),
            "speculate": speculate,
            "adapters": adapters,
        }[scenario](tokenizer_path, ckpt_dirs)
        torch.save(results, Path(out_dir) / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
