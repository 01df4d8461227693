"""Fixtures for the vLLM plugin tests (run by `make test-vllm` in .venv-vllm; `make test` never collects them).

`checkpoints`: the tiny LLaVA-1.5 / Qwen2.5-VL / Qwen3-VL checkpoints (tiny_models.py), built once per session.
`run_engine(spec)`: one vLLM engine in a subprocess (engine_run.py), its JSON result.
`reference(family, method, retention)`: dstp's own engine on the same checkpoint (dstp.load), per request.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import tiny_models

HERE = pathlib.Path(__file__).resolve().parent

QUESTION = "What is in the image? Describe the picture in one sentence."
MAX_TOKENS = 12


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("vllm-checkpoints")
    return {family: tiny_models.build(family, root / family) for family in tiny_models.FAMILIES}


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Four different images (PIL, and the PNG files the engine subprocess reads), of four sizes: Qwen-VL gives
    them different visual token counts; LLaVA-1.5 resizes every image to 16 tokens."""
    root = tmp_path_factory.mktemp("vllm-images")
    pil = tiny_models.sample_images(4, seed=5, sizes=[(40, 40), (64, 32), (32, 72), (96, 64)])
    paths = []
    for i, im in enumerate(pil):
        paths.append(root / f"image{i}.png")
        im.save(paths[-1])
    return pil, [str(p) for p in paths]


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    return env


@pytest.fixture(scope="session")
def run_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-runs")
    count = iter(range(10**6))

    def run(spec: dict, timeout: float = 420, env: dict | None = None) -> dict:
        i = next(count)
        spec_path, out_path = root / f"spec{i}.json", root / f"out{i}.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(spec_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout, env=env or engine_env())
        if proc.returncode != 0:
            raise EngineFailed(proc.returncode, proc.stderr)
        return json.loads(out_path.read_text())

    return run


class EngineFailed(Exception):
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        self.last_line = lines[-1] if lines else ""
        super().__init__(f"engine exited with {returncode}: {self.last_line}\n{stderr[-4000:]}")


def chat_prompt(path: pathlib.Path, n_images: int = 1, question: str = QUESTION) -> str:
    """The prompt text the family's chat template renders for one user turn (images first), generation prompt on."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


@pytest.fixture(scope="session")
def reference(checkpoints, images):
    """dstp's engine, one request at a time (batch 1: the row dstp prunes is that request's one image): per image
    (all four, or `image_indices`), its tokens, prompt length, visual-token count and kept visual tokens."""
    import dstp
    from dstp import PruneConfig

    pipes, cache = {}, {}
    pil, _ = images

    def ref(family: str, method: str | None, retention: float = 1.0, max_tokens: int = MAX_TOKENS,
            question: str = QUESTION, image_indices=None):
        key = (family, method, retention, max_tokens, question, image_indices)
        if key not in cache:
            if (family, method, retention) not in pipes:
                prune = PruneConfig(method=method, retention=retention) if method else None
                pipes[(family, method, retention)] = dstp.load(checkpoints[family], prune=prune, dtype="float32")
            pipe = pipes[(family, method, retention)]
            prompt = chat_prompt(checkpoints[family], question=question)
            rows = []
            for im in (pil if image_indices is None else [pil[i] for i in image_indices]):
                out = pipe.generate([im], [prompt], max_new_tokens=max_tokens, do_sample=False, stop_token_ids=())
                prepared = pipe.prepare([im], [prompt])
                rows.append({"tokens": out.tokens[0, :out.trace.new_tokens[0]].tolist(),
                             "prompt_len": int(prepared.attention_mask.sum()),
                             "n_visual": int(prepared.visual_mask.sum()), "kept": out.trace.kept[0]})
            cache[key] = rows
        return cache[key]

    return ref
