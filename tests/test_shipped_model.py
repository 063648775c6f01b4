"""The model that ships in checkpoints/tiny-stdlib: it loads, writes Python, and beats a unigram model."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED, BUNDLED_TOKENIZER
from llama import Llama, Tokenizer
from llama.perplexity import text_windows, unigram_log_probs, unigram_loss, window_loss

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)

# Recorded from the shipped checkpoint: greedy decoding on CPU in float32. It changes only when the
# checkpoint (or the model's arithmetic) changes.
PROMPT = 'def remove_non_ascii(s: str) -> str:\n    """'
EXPECTED_GREEDY_COMPLETION = "\n    A string of the string, and the string is a string.\n\n    The string is a string,"
HELDOUT_CHARS = 4000  # from each of the first held-out files: a few KB keeps the test fast
HELDOUT_FILES = 3


@pytest.fixture(scope="module")
def generator():
    return Llama.build(
        str(BUNDLED), str(BUNDLED_TOKENIZER), max_seq_len=256, max_batch_size=8, device="cpu", dtype="float32"
    )


def heldout_texts():
    return [
        p.read_text(encoding="utf-8")[:HELDOUT_CHARS] for p in train.split_files(heldout_percent=5)[1][:HELDOUT_FILES]
    ]


def test_shipped_checkpoint_is_small_bfloat16_in_metas_layout():
    assert sorted(p.name for p in BUNDLED.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) <= 25e6
    state = torch.load(BUNDLED / "consolidated.00.pth", weights_only=True, mmap=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_shipped_tokenizer_has_llamas_special_ids_and_round_trips_any_text():
    tokenizer = Tokenizer(str(BUNDLED_TOKENIZER))
    assert (tokenizer.sp_model.unk_id(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, -1)
    assert 2048 <= tokenizer.n_words <= 8192
    text = "    def f(x):\n\treturn 'héllo wörld ✓ 中文'  # trailing  \n\n"
    tokens = tokenizer.encode(text, bos=True, eos=True)
    assert tokens[0] == 1 and tokens[-1] == 2
    assert tokenizer.decode(tokens[1:-1]) == text


def test_greedy_completion_of_a_fixed_prompt_is_stable(generator):
    result = generator.text_completion([PROMPT], temperature=0.0, max_gen_len=24)
    assert result[0]["generation"] == EXPECTED_GREEDY_COMPLETION


def test_shipped_model_is_far_better_than_a_unigram_model_on_heldout_stdlib_source(generator):
    texts = heldout_texts()
    windows = text_windows(generator.tokenizer, texts, max_seq_len=256)
    model = window_loss(generator.model, windows, batch_size=8)
    training_files = train.split_files(heldout_percent=5)[0]
    training_tokens = train.token_stream(generator.tokenizer, train.read_texts(training_files))
    unigram = unigram_loss(unigram_log_probs(training_tokens, generator.tokenizer.n_words), windows)
    assert model["tokens"] == unigram["tokens"] > 2000
    assert model["perplexity"] < unigram["perplexity"] / 4


def test_perplexity_command_reports_loss_and_perplexity_of_the_shipped_model(generator, tmp_path):
    text_file = tmp_path / "heldout.py"
    text_file.write_text(heldout_texts()[0])
    result = subprocess.run(  # no --tokenizer_path: the checkpoint folder's own tokenizer.model
        [
            sys.executable,
            "-m",
            "llama.perplexity",
            "--ckpt_dir",
            str(BUNDLED),
            "--text_file",
            str(text_file),
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = window_loss(
        generator.model, text_windows(generator.tokenizer, [text_file.read_text()], 256), batch_size=8
    )
    assert f"1 file(s), {expected['tokens']} tokens scored" in result.stdout
    assert f"mean loss {expected['loss']:.4f} nats/token, perplexity {expected['perplexity']:.2f}" in result.stdout


def test_perplexity_command_names_a_missing_text_file_in_one_line_and_exits_2(tmp_path):
    missing = tmp_path / "missing.txt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama.perplexity",
            "--ckpt_dir",
            str(BUNDLED),
            "--tokenizer_path",
            str(BUNDLED_TOKENIZER),
            "--text_file",
            str(missing),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: text file not found: {missing}\n"


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "float8_e4m3fn"])
def test_an_8_bit_kv_cache_scores_held_out_text_within_half_a_percent_of_the_float_caches_perplexity(
    generator, kv_cache_dtype
):
    """Each window scored through the engine: its prefill writes the pool and attends over it as the pool
    holds it. int8 (and float8) keys and values move the held-out perplexity by less than 0.5%, and do
    move it: the 8-bit pool is read."""
    stored = Llama.build(
        str(BUNDLED), max_seq_len=256, max_batch_size=8, device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype
    )
    windows = text_windows(generator.tokenizer, heldout_texts(), max_seq_len=256)
    pairs = [(window[:1], window[1:]) for window in windows]

    def perplexity(llama: Llama) -> float:
        logprobs = [logprob for row, _ in llama.engine.score(pairs) for logprob in row]
        return math.exp(-sum(logprobs) / len(logprobs))

    expected, eight_bit = perplexity(generator), perplexity(stored)
    assert expected == pytest.approx(window_loss(generator.model, windows, batch_size=8)["perplexity"], rel=1e-5)
    assert eight_bit != expected and abs(eight_bit / expected - 1) < 0.005
