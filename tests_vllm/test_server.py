"""Once through vLLM's OpenAI-compatible server (`vllm serve`'s, started as `python -m
vllm.entrypoints.openai.api_server`) on 127.0.0.1 with the plugin configured by
`--hf-overrides`, four concurrent chat requests (four different images as base64 data URLs) from the `openai`
client, greedy; the tokens equal dstp's `pipe.chat` on the same conversations. The server is started for this test
and stopped at its end (SIGTERM, then SIGKILL after 30 s); the whole test is bounded by its timeouts."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from conftest import MAX_TOKENS, QUESTION

FAMILY, METHOD, RETENTION = "qwen2_5_vl", "divprune", 0.25
START_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wait_healthy(url: str, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"vllm serve not healthy after {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_openai_server_chat_equals_dstp_chat(checkpoints, images, tmp_path):
    from openai import OpenAI

    import dstp
    from dstp import PruneConfig

    path, pil = checkpoints[FAMILY], images[0]
    port = free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    env.pop("VLLM_PLUGINS", None)
    overrides = json.dumps({"dstp": {"method": METHOD, "retention": RETENTION}})
    # vllm-cpu's `vllm` command asks for the version of a distribution named "vllm" (it is "vllm-cpu") and stops;
    # the module below is the same OpenAI-compatible server, with the same flags
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
           "--served-model-name", "tiny", "--hf-overrides", overrides]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)

        def ask(image):
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                     {"type": "text", "text": QUESTION}]}]
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
            return r.choices[0].model_extra["token_ids"], r.usage.prompt_tokens

        with ThreadPoolExecutor(len(pil)) as pool:  # concurrent: the server batches them
            answers = list(pool.map(ask, pil))
    finally:
        stop(proc)
    assert proc.returncode is not None

    pipe = dstp.load(path, prune=PruneConfig(method=METHOD, retention=RETENTION), dtype="float32")
    conversations = [[{"role": "user", "content": [{"type": "image", "image": im},
                                                   {"type": "text", "text": QUESTION}]}] for im in pil]
    for (tokens, prompt_tokens), conversation in zip(answers, conversations):
        ref = pipe.chat([conversation], max_new_tokens=MAX_TOKENS, do_sample=False, stop_token_ids=())
        assert tokens == ref.tokens[0].tolist()
        prepared = pipe.prepare_chat([conversation])
        n = int(prepared.visual_mask.sum())
        k = -(-n // 4)  # ceil(0.25 * n)
        assert prompt_tokens == int(prepared.attention_mask.sum()) - (n - k)
