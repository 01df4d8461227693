"""ShiftBench: the embedded testbed (tasks, renderer, processor, model, training, shipped checkpoint)."""

from __future__ import annotations

from pathlib import Path

from dstp.shiftbench.evaluation import evaluate, greedy_generate
from dstp.shiftbench.tasks import TASKS, Sample, check_answer, generate_samples, parse_answer

__all__ = [
    "TASKS",
    "Sample",
    "check_answer",
    "default_checkpoint_dir",
    "evaluate",
    "generate_samples",
    "greedy_generate",
    "load_shiftbench",
    "parse_answer",
]


def default_checkpoint_dir() -> Path:
    """The directory of the shipped ShiftBench model (weights, config, tokenizer, model card)."""
    return Path(__file__).resolve().parent / "checkpoint"


def load_shiftbench(path=None):
    """(model, processor) from ``path`` (default: the shipped checkpoint), model in eval mode."""
    from dstp.shiftbench.modeling import ShiftBenchForConditionalGeneration
    from dstp.shiftbench.processor import ShiftBenchProcessor

    path = Path(path) if path is not None else default_checkpoint_dir()
    model = ShiftBenchForConditionalGeneration.from_pretrained(path)
    model.eval()
    return model, ShiftBenchProcessor.from_pretrained(path)

