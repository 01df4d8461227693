"""The ShiftBench model through the engine equals its own HF forward (random weights, no checkpoint needed)."""
import torch

from dstp.config import GenerationConfig
from dstp.engine.engine import Engine
from dstp.models.registry import adapter_for_model
from dstp.lab.shiftbench import generate_samples
from dstp.lab.shiftbench.processor import ShiftBenchProcessor
from dstp.lab.shiftbench.train import TrainConfig, build_model


@torch.no_grad()
def test_engine_equals_model_forward_on_random_shiftbench_model():
    processor = ShiftBenchProcessor.build()
    model = build_model(TrainConfig(seed=3), processor).eval()
    samples = generate_samples("walk", 3, seed=5, hops=2) + generate_samples("lookup", 1, seed=5)
    batch = processor(images=[s.image for s in samples], text=[s.prompt for s in samples])
    adapter = adapter_for_model(model, processor)
    out = Engine(adapter).generate(adapter.prepare(batch), GenerationConfig(max_new_tokens=6, stop_token_ids=()), return_logits=True)
    # HF's forward refuses a generated image token; the random model must not emit one for this comparison
    assert not (out.tokens == processor.image_token_id).any(), "pick another seed"
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for t in range(6):  # greedy, no cache: the whole sequence through HF each step
        logits = model(input_ids=ids, pixel_values=batch["pixel_values"], attention_mask=mask).logits[:, -1]
        assert (logits - out.logits[:, t]).abs().max() < 1e-4
        assert torch.equal(logits.argmax(-1), out.tokens[:, t])
        ids = torch.cat([ids, out.tokens[:, t:t + 1]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


@torch.no_grad()
def test_hidden_tokens_in_training_equal_pruned_tokens_in_the_engine():
    # the trainer hides unneeded visual tokens with an attention mask and keeps every position; the engine's
    # pruning before layer 0 must compute the same next-token logits (what the hiding teaches must transfer)
    from dstp.config import PruneConfig
    from dstp.pruners import get_pruner

    processor = ShiftBenchProcessor.build()
    model = build_model(TrainConfig(seed=4, layers=3), processor).eval()
    samples = generate_samples("lookup", 2, seed=8)
    batch = processor(images=[s.image for s in samples], text=[s.prompt for s in samples])
    n_vis = processor.num_image_tokens
    g = torch.Generator().manual_seed(0)
    kept = torch.zeros(2, n_vis, dtype=torch.bool)
    for b in range(2):
        kept[b, torch.randperm(n_vis, generator=g)[:48]] = True
    adapter = adapter_for_model(model, processor)
    pruner = get_pruner(PruneConfig("oracle", 48 / n_vis, layer=0), adapter.n_layers)
    out = Engine(adapter).generate(adapter.prepare(batch), GenerationConfig(max_new_tokens=1, stop_token_ids=()),
                                   pruner=pruner, relevant=kept, return_logits=True)
    assert out.trace.kept == [kept[b].nonzero().squeeze(-1).tolist() for b in range(2)]
    ids = batch["input_ids"]
    visible = batch["attention_mask"].clone()
    visible[ids == processor.image_token_id] = kept.flatten().long()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding, every token keeps its place
    logits = model(input_ids=ids, pixel_values=batch["pixel_values"], attention_mask=visible,
                   position_ids=positions).logits[:, -1]
    assert (logits - out.logits[:, 0]).abs().max() < 1e-4
