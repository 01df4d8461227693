"""dstp's own attention call (engine/attention.py) and its registration with transformers (models/hf_compat.py)."""
import copy

import pytest
import torch

from dstp.engine.attention import CAUSAL, UNMASKED, Attention
from dstp.models.registry import adapter_for_model
from test_engine import FAMILIES


def qkv(B=2, H=4, Hkv=2, Tq=5, S=5, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, hd, generator=g), torch.randn(B, Hkv, S, hd, generator=g),
            torch.randn(B, Hkv, S, hd, generator=g))


def naive(q, k, v, allowed, scale):
    """Softmax attention written out, K/V heads shared by consecutive query heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def test_causal_is_the_lower_triangle():
    q, k, v = qkv()
    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(CAUSAL(q, k, v, 0.3), naive(q, k, v, tril, 0.3))
    torch.testing.assert_close(CAUSAL(q, k, v, 0.3), Attention(mask=tril[None, None])(q, k, v, 0.3))


def test_unmasked_sees_every_key_and_grouped_heads_share_kv():
    q, k, v = qkv(Tq=1, S=7)
    torch.testing.assert_close(UNMASKED(q, k, v, 0.5), naive(q, k, v, torch.ones(1, 7, dtype=torch.bool), 0.5))


def test_a_mask_per_row():
    q, k, v = qkv(Tq=3, S=6)
    mask = torch.rand(2, 1, 3, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True
    torch.testing.assert_close(Attention(mask=mask)(q, k, v, 0.2), naive(q, k, v, mask, 0.2))


def test_causal_needs_one_key_per_query():
    q, k, v = qkv(Tq=2, S=5)
    with pytest.raises(ValueError, match="2 queries and 5 keys"):
        CAUSAL(q, k, v, 1.0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_outside_the_engine_the_model_is_transformers_sdpa(name):
    """The wrapped model's own generate() (attn_implementation "dstp" without the engine's Attention) gives logits
    bit-identical to the same weights with transformers' "sdpa"."""
    make, _, three = FAMILIES[name]
    sdpa = make()
    wrapped = copy.deepcopy(sdpa)
    adapter_for_model(wrapped)
    assert wrapped.config.get_text_config()._attn_implementation == "dstp"
    assert sdpa.config.get_text_config()._attn_implementation == "sdpa"
    batch = three()
    runs = [m.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
            for m in (sdpa, wrapped)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].logits, runs[1].logits))
