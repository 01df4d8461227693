"""What a generation run reports besides its tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepTrace:
    """Per decoding step, one entry per batch row (tensors of shape [B])."""

    visual_attended: torch.Tensor  # visual tokens the new token attends to at the last stage's layers
    similarity: torch.Tensor | None = None  # DSTP: cos(a_l, a0)
    shift: torch.Tensor | None = None  # DSTP: a shift was detected at this step
    active: torch.Tensor | None = None  # DSTP: size of the active visual set
    revived: list[list[int]] | None = None  # DSTP: visual-token indices revived at this step, per row
    revived_mask: torch.Tensor | None = None  # DSTP, while decoding: [B, Nmax] the window's revived set
    selected_mask: torch.Tensor | None = None  # VisionPulse: [B, Nmax] the visual tokens read at layers >= anchor


@dataclass
class Trace:
    n_visual: list[int]
    kept: list[list[int]]  # per row, kept visual-token indices (rank among the row's visual tokens): S0
    prune_layer: int  # the first prune point
    # per pruned stage: (its first layer, per row its kept visual-token indices); one entry for a single stage
    stages: list[tuple[int, list[list[int]]]] = field(default_factory=list)
    steps: list[StepTrace] = field(default_factory=list)
    prefill_flops: float = 0.0
    decode_flops: float = 0.0
    kv_bytes_peak: int = 0  # every buffer the engine allocated for the run: KV stores, pruning and DSTP state
    memory_bytes: dict = field(default_factory=dict)  # the same by what it is for, + the prepared inputs (held_bytes)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: list[int] = field(default_factory=list)

    def row(self, b: int) -> dict:
        """Plain-Python per-step trace of one sequence."""
        out = []
        for t, s in enumerate(self.steps[: self.new_tokens[b] if self.new_tokens else None]):
            rec = {"step": t, "visual_attended": int(s.visual_attended[b])}
            if s.similarity is not None:
                rec.update(similarity=float(s.similarity[b]), shift=bool(s.shift[b]), active=int(s.active[b]),
                           revived=s.revived[b] if s.revived else [])
            if s.selected_mask is not None:
                rec["selected"] = torch.nonzero(s.selected_mask[b]).flatten().tolist()
            out.append(rec)
        rec = {"n_visual": self.n_visual[b], "kept": self.kept[b], "prune_layer": self.prune_layer, "steps": out}
        if len(self.stages) > 1:
            rec["stages"] = [{"layer": layer, "kept": kept[b]} for layer, kept in self.stages]
        return rec
