"""The ShiftBench model through the engine equals its own HF forward (random weights, no checkpoint needed)."""
import torch

from dstp.config import GenerationConfig
from dstp.engine.engine import Engine
from dstp.models.registry import adapter_for_model
from dstp.shiftbench import generate_samples
from dstp.shiftbench.processor import ShiftBenchProcessor
from dstp.shiftbench.train import TrainConfig, build_model


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
