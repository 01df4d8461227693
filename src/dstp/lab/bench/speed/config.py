"""The shapes `dstp speed` runs: its two synthetic scenarios (the package docstring, lab/bench/speed/__init__.py) and
the fields the `real` scenario fills from a published config.json (real.py)."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SpeedConfig:
    scenario: str
    grid: int | None  # visual tokens = grid^2 (the synthetic scenarios; None in `real`, where the image decides)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    new_tokens: int
    shift_every: int  # DSTP rows: a forced shift every n decoding steps
    window: int = 20
    prompt_text: int = 16
    retention: float = 0.333
    prune_layer: int = 2
    repeats: int = 3  # timed runs per row, after one tracked run (peak memory; also the warm-up)
    seed: int = 0
    # the `real` scenario: a published config.json (`real_speed_config`) and what it and the image give
    model_config: str | None = None  # the config.json it was built from
    architecture: str | None = None
    image: str | None = None  # "WxH" of the image the family's processor would have been given
    head_dim: int | None = None  # None: hidden // heads
    n_visual: int | None = None  # None: grid^2
    n_prompt: int | None = None  # None: BOS + prompt_text + grid^2

    @property
    def visual_tokens(self) -> int:
        return self.grid ** 2 if self.n_visual is None else self.n_visual

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_text + 1 + self.grid ** 2 if self.n_prompt is None else self.n_prompt

    @property
    def kv_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


SCENARIOS = {
    # the fidelity models' shapes (tests' tiny LLaVA: 4 layers x 64, 25 visual tokens), batch 1: every kernel is tiny,
    # so a step costs its launches and Python, which compiling removes
    "overhead-bound": SpeedConfig("overhead-bound", grid=5, hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128,
                                  vocab=128, batch=1, new_tokens=256, shift_every=32, prune_layer=1, repeats=3),
    "kv-bound": SpeedConfig("kv-bound", grid=48, hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1024,
                            vocab=1024, batch=4, new_tokens=32, shift_every=8, repeats=5),
    "weight-bound": SpeedConfig("weight-bound", grid=32, hidden=1024, layers=8, heads=8, kv_heads=2,
                                intermediate=2816, vocab=32000, batch=1, new_tokens=1024, shift_every=32, repeats=1),
}
# a quick look (and the tests): the same rows on shapes that run in seconds
SMALL = {
    "overhead-bound": replace(SCENARIOS["overhead-bound"], new_tokens=24, shift_every=8, window=4, repeats=1),
    "kv-bound": replace(SCENARIOS["kv-bound"], grid=16, hidden=128, layers=4, heads=4, kv_heads=4, intermediate=256,
                        vocab=256, batch=2, new_tokens=12, shift_every=4, repeats=1),
    "weight-bound": replace(SCENARIOS["weight-bound"], grid=8, hidden=256, layers=6, heads=4, kv_heads=2,
                            intermediate=512, vocab=1024, new_tokens=24, shift_every=8, window=4, repeats=1),
}
