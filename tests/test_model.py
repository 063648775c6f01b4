"""The model's numbers against transformers' independent Llama implementation, and the cache's."""

import pytest
import torch

from conftest import SMALL_PARAMS, to_transformers
from llama.model import ModelArgs, Transformer


@pytest.fixture(scope="module")
def llama_and_state(make_llama, checkpoint):
    return make_llama(max_seq_len=128, max_batch_size=4), checkpoint[1]


def test_logits_match_transformers(llama_and_state):
    llama, state = llama_and_state
    hf = to_transformers(state, SMALL_PARAMS, vocab_size=512)
    tokens = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    ours = llama.model.forward(tokens.to(llama.device), 0).cpu()
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(llama_and_state):
    llama, state = llama_and_state
    hf = to_transformers(state, SMALL_PARAMS, vocab_size=512)
    prompt = llama.tokenizer.encode("def remove_non_ascii(s: str) -> str:", bos=True, eos=False)
    ours, _ = llama.generate([prompt], max_gen_len=30, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=2, pad_token_id=2)
    theirs = theirs[0, len(prompt) :].tolist()
    if 2 in theirs:
        theirs = theirs[: theirs.index(2)]
    assert ours[0] == theirs


def test_chunked_feeding_equals_one_pass(llama_and_state):
    llama, _ = llama_and_state
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2)).to(llama.device)
    whole = llama.model.forward(tokens, 0)
    chunks = [llama.model.forward(tokens[:, a:b], a) for a, b in [(0, 7), (7, 8), (8, 21), (21, 30)]]
    assert torch.allclose(torch.cat(chunks, dim=1), whole, atol=1e-5)


def test_forward_without_start_pos_equals_cached_forward_and_has_gradients(llama_and_state):
    llama, _ = llama_and_state
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3)).to(llama.device)
    cached = llama.model.forward(tokens, 0)
    free = llama.model.forward(tokens)
    assert torch.allclose(free, cached, atol=1e-5)
    free.sum().backward()
    assert llama.model.layers[0].attention.wqkv.weight.grad is not None
    llama.model.zero_grad(set_to_none=True)


def test_state_dict_keeps_meta_s_keys_and_loads_them_into_the_fused_layers(llama_and_state):
    llama, state = llama_and_state
    saved = llama.model.state_dict()
    assert list(saved) == list(state)  # wq, wk, wv, w1, w3 apart, in Meta's order
    assert all(torch.equal(saved[key], state[key].float()) for key in state)
    model = Transformer(llama.model.params)
    model.load_state_dict(state)
    attention, feed_forward = model.layers[1].attention, model.layers[1].feed_forward
    assert torch.equal(
        attention.wqkv.weight, torch.cat([state[f"layers.1.attention.{w}.weight"] for w in ("wq", "wk", "wv")]).float()
    )
    assert torch.equal(
        feed_forward.w13.weight, torch.cat([state[f"layers.1.feed_forward.{w}.weight"] for w in ("w1", "w3")]).float()
    )


def test_kv_cache_is_a_pool_of_blocks_preallocated_in_model_dtype(llama_and_state):
    llama, _ = llama_and_state
    cache = llama.model.layers[0].attention.kv_cache.cache_k
    # per head: 4 rows x 128 positions by default, in blocks of 16, and the scratch block
    assert cache.shape == (SMALL_PARAMS["n_kv_heads"], 1 + 4 * 128 // 16, 16, 8)
    assert cache.dtype == torch.float32


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05}, 6_738_415_616),
        ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05}, 13_015_864_320),
        (
            {
                "dim": 8192,
                "multiple_of": 4096,
                "ffn_dim_multiplier": 1.3,
                "n_heads": 64,
                "n_kv_heads": 8,
                "n_layers": 80,
                "norm_eps": 1e-05,
            },
            68_976_648_192,
        ),
    ],
)
def test_published_parameter_counts(params, expected):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_dict({**params, "vocab_size": 32000}))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_unknown_params_key_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_expert'\].*known keys are \['dim'"):
        ModelArgs.from_dict({"dim": 64, "n_expert": 8})
