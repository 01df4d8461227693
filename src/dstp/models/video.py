"""Video in the adapters: where each video token sits in its clip, and how a video file becomes frames.

A *frame* here is one step of the LLM's time axis: for Qwen2.5-VL / Qwen3-VL one temporal patch of the vision
tower (`temporal_patch_size` = 2 input frames), i.e. one row of the video's `video_grid_thw`. A video of t frames
of h x w LLM tokens (after the spatial merge) fills its placeholders frame after frame, each frame in raster
order; that is the layout `video_layout` assumes (an adapter whose family lays video tokens out otherwise builds
its own `VideoLayout`)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dstp.errors import InputError


@dataclass
class VideoLayout:
    """Per visual token (rank among the row's visual tokens, padded to Nmax, as PruneContext addresses them)."""
    video: torch.Tensor  # [B, Nmax] long: which video of its row the token belongs to (-1: an image token, padding)
    frame: torch.Tensor  # [B, Nmax] long: its frame within that video (-1 off video)
    previous: torch.Tensor  # [B, Nmax] long: rank of the same spatial token in the previous frame (-1: none)

    @property
    def is_video(self) -> torch.Tensor:
        return self.video >= 0


def video_layout(visual_mask: torch.Tensor, video_mask: torch.Tensor, grids: list[tuple[int, int, int]]):
    """The VideoLayout of a batch whose videos (in placeholder order, row 0's first) have `grids` (t, h, w) in LLM
    tokens, each filling its placeholders frame by frame in raster order."""
    B, n = visual_mask.shape[0], int(visual_mask.sum(-1).max()) if visual_mask.numel() else 0
    device = visual_mask.device
    rank = torch.argsort((~visual_mask).to(torch.int8), dim=-1, stable=True)[:, :n]  # original index by rank
    valid = torch.arange(n, device=device)[None] < visual_mask.sum(-1, keepdim=True)
    on_video = video_mask.gather(1, rank) & valid  # [B, n]
    rows, ranks = torch.nonzero(on_video, as_tuple=True)  # every video token, row-major = placeholder order
    videos, frames, prev = [], [], []
    start, row_count = 0, {}
    for t, h, w in grids:
        size = t * h * w
        b = int(rows[start]) if size else 0
        local = torch.arange(size, device=device)
        videos.append(torch.full((size,), row_count.get(b, 0), device=device))
        frames.append(local // (h * w))
        prev.append(torch.where(local >= h * w, ranks[start:start + size].roll(h * w), -1))
        row_count[b] = row_count.get(b, 0) + 1
        start += size
    if start != rows.numel():
        raise InputError(f"the videos' grids give {start} video tokens but the prompts hold {rows.numel()} video "
                         f"placeholder tokens; let the processor expand the video token")
    out = [torch.full((B, n), -1, dtype=torch.long, device=device) for _ in range(3)]
    for o, parts in zip(out, (videos, frames, prev)):
        if parts:
            o[rows, ranks] = torch.cat(parts).long()
    return VideoLayout(*out)


def decoder_backend() -> str | None:
    """The installed decoder that transformers' `load_video` can read files with offline (PyAV, else OpenCV)."""
    import importlib.util

    for module, backend in (("av", "pyav"), ("cv2", "opencv")):
        if importlib.util.find_spec(module) is not None:
            return backend
    return None


def decode_video(path: str):
    """(frames [T, H, W, 3] uint8, transformers' VideoMetadata) of a video file, every frame, decoded with
    transformers' `load_video` (PyAV, else OpenCV). The processors' own default decoder (torchcodec) is an
    optional install; decoding here keeps a file's fps in the metadata the processor samples frames with."""
    from transformers.video_utils import load_video

    backend = decoder_backend()
    if backend is None:
        raise InputError(f"cannot decode the video file {path!r}: no video decoder is installed (pip install av); "
                         f"pass its frames instead (a list of PIL images or an array [T, H, W, C])")
    if path.startswith(("http://", "https://")):
        raise InputError(f"video URLs are not fetched: {path!r}; download the file and pass its path")
    if not os.path.isfile(path):
        raise InputError(f"video file not found: {path!r}")
    try:
        frames, metadata = load_video(path, backend=backend)
    except Exception as e:  # each decoder raises its own types (av.error.*, cv2.error, ValueError)
        text = str(e).strip().splitlines()
        raise InputError(f"cannot decode the video file {path!r} ({backend}): "
                         f"{text[0] if text else type(e).__name__}") from None
    if len(frames) == 0:
        raise InputError(f"the video file {path!r} holds zero frames")
    return frames, metadata
