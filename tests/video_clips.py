"""Generated video clips for the video tests: frames of a coloured square that moves (or stays), and files of them.

`moving_square(n, seed)`: n frames [T, H, W, 3] uint8 on a grey noisy background, a red square that appears in
one frame only (`red_frame`) and a blue square drifting left to right. `write_clip(frames, path, fps)`: an MPEG-4
file written with PyAV, which transformers' `load_video(backend="pyav")` reads back (tests/test_video.py checks)."""
from __future__ import annotations

import numpy as np


def moving_square(n: int, seed: int, size=(48, 32), red_frame: int | None = None, side: int = 10) -> np.ndarray:
    w, h = size
    rng = np.random.default_rng(seed)
    base = np.clip(128 + rng.integers(-12, 13, size=(h, w, 3)), 0, 255)
    frames = np.repeat(base[None], n, axis=0).astype(np.uint8)
    for t in range(n):
        x = int(round(t * (w - side) / max(n - 1, 1)))
        frames[t, h - side:, x:x + side] = (30, 60, 220)
        if t == red_frame:
            frames[t, 2:2 + side, w // 2 - side // 2:w // 2 + side // 2] = (230, 20, 20)
    return frames


def write_clip(frames: np.ndarray, path, fps: int = 4) -> str:
    import av

    path = str(path)
    container = av.open(path, "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.options = {"qscale": "1"}  # near-lossless: the red square survives encoding
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path
