"""Compiling the decoding step: `torch.compile(fullgraph=True)`, with CUDA graphs on CUDA.

The step's shapes depend only on the KV stores' capacities, which grow by whole chunks (`kv_store.GROW_CHUNK`), so
it compiles once for the first capacity and once more, with the capacity as a dynamic size, when the stores first
grow; after that nothing recompiles. Every tensor the step writes in place lives as long as the generation and is
marked a static address, so that CUDA graphs replay it without copying.
"""
from __future__ import annotations

import shutil

import torch

from dstp.errors import ConfigError


def check_can_compile(device: torch.device, backend: str):
    """A one-line ConfigError when the installed torch cannot compile the step on `device`."""
    if backend != "inductor":
        return
    if device.type == "cuda":
        from torch.utils._triton import has_triton  # only asked when compiling for CUDA

        if not has_triton():
            raise ConfigError("compile=True on CUDA needs Triton, which this torch install lacks "
                              "(pip install triton, or run with compile=False)")
    elif device.type == "cpu":
        if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
            raise ConfigError("compile=True on CPU needs a C++ compiler (g++ or clang++) on PATH, which this machine "
                              "lacks (install one, or run with compile=False)")
    else:
        raise ConfigError(f"compile=True is supported on CPU and CUDA, not on {device.type}; run with compile=False")


def check_backend(backend):
    """A one-line ConfigError for a backend name torch.compile does not know (a callable backend is taken as is)."""
    if isinstance(backend, str) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"unknown torch.compile backend {backend!r}; e.g. inductor (the default) or eager")


def compile_step(step, config, device: torch.device):
    """`step` compiled as the engine's config asks, or `step` itself when the user asked to fall back and this
    torch cannot compile on `device`."""
    check_backend(config.compile_backend)
    try:
        check_can_compile(device, config.compile_backend)
    except ConfigError:
        if config.compile_fallback:
            return step
        raise
    mode = config.compile_mode or ("reduce-overhead" if device.type == "cuda" else None)
    return torch.compile(step, fullgraph=True, backend=config.compile_backend, mode=mode)


def mark_static(tensors):
    """Tell CUDA graphs that these long-lived buffers, written in place by the step, keep their address between
    steps (no copy into the graph's own buffers); no guard, so a new generation's buffers do not recompile."""
    for t in tensors:
        if t.is_cuda:
            torch._dynamo.mark_static_address(t, guard=False)
