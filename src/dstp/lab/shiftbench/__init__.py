"""ShiftBench: the embedded testbed (tasks, renderer, processor, model, training, shipped checkpoint).

Importing it registers the ShiftBench model: with transformers' Auto classes (`modeling`) and with dstp's adapter
registry (`adapter`), so that `dstp.load(default_checkpoint_dir())` serves it. `dstp.load` of a ShiftBench checkpoint
imports this package itself (the `dstp.adapters` entry point); loading any other model does not."""

from __future__ import annotations

from pathlib import Path

from dstp.lab.shiftbench.adapter import ShiftBenchAdapter
from dstp.lab.shiftbench.evaluation import evaluate, greedy_generate
from dstp.lab.shiftbench.modeling import ShiftBenchForConditionalGeneration
from dstp.lab.shiftbench.processor import ShiftBenchProcessor
from dstp.lab.shiftbench.tasks import TASKS, Sample, check_answer, generate_samples, parse_answer

__all__ = [
    "TASKS",
    "Sample",
    "ShiftBenchAdapter",
    "ShiftBenchForConditionalGeneration",
    "ShiftBenchProcessor",
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
    path = Path(path) if path is not None else default_checkpoint_dir()
    model = ShiftBenchForConditionalGeneration.from_pretrained(path)
    model.eval()
    return model, ShiftBenchProcessor.from_pretrained(path)

