"""Generation settings: transformers' logits processing reproduced, checkpoint defaults and their overrides."""
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from dstp import ConfigError, GenerationConfig
from dstp.config import generation_config
from dstp.engine.sampling import apply_repetition_penalty, warp


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 1.0), (0.1, 1, 0.001), (0.7, 5, 0.8),
                                                     (1.3, 0, 0.95), (2.0, 3, 1.0)])
def test_warpers_equal_transformers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 97, generator=g) * 3
    logits[0, :10] = 1.5  # ties at the k-th value
    ids = torch.randint(0, 97, (4, 7), generator=g)
    hf = logits.clone()
    for proc in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                 TopPLogitsWarper(top_p) if top_p < 1 else None):
        if proc is not None and not (isinstance(proc, TemperatureLogitsWarper) and temperature == 1.0):
            hf = proc(ids, hf)
    ours = warp(logits, GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    assert torch.allclose(ours[~torch.isinf(ours)], hf[~torch.isinf(hf)])


def test_repetition_penalty_equals_transformers():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    hf = RepetitionPenaltyLogitsProcessor(1.05)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.05), hf)


def test_checkpoint_defaults_and_overrides():
    qwen = {"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05}
    cfg = generation_config(16, qwen, {})
    assert (cfg.do_sample, cfg.top_k, cfg.top_p, cfg.temperature, cfg.repetition_penalty) == (True, 1, 0.001, 0.1,
                                                                                               1.05)
    assert generation_config(16, qwen, {"temperature": 0.5}).temperature == 0.5
    greedy = generation_config(16, qwen, {"do_sample": False})
    assert not greedy.do_sample and greedy.repetition_penalty == 1.0  # plain greedy
    assert generation_config(16, qwen, {"do_sample": False, "repetition_penalty": 1.2}).repetition_penalty == 1.2
    assert generation_config(16, {}, {}) == GenerationConfig(max_new_tokens=16)
    with pytest.raises(ConfigError, match="unknown generation argument"):
        generation_config(16, {}, {"temprature": 0.5})
    with pytest.raises(ConfigError, match="top_k"):
        GenerationConfig(top_k=-1)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=2.5)
