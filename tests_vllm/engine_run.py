"""Run one offline vLLM engine (`LLM.generate`) on a list of requests and write what it produced as JSON.

    python tests_vllm/engine_run.py SPEC.json OUT.json

SPEC: {"model": DIR, "hf_overrides": {...} or null, "max_tokens": N, "requests": [{"prompt": TEXT, "images":
[PNG, ...], "video": {"frames": NPY of [T, H, W, 3] uint8, "metadata": {...}} (optional)}, ...], "max_num_seqs": N
(default 64), "repeats": N (default 0: timed generate calls after the first), "limit_mm_per_prompt": {...} (default
{"image": 4}), "block_size": N (default: vLLM's)}.
OUT: {"start_s", "generate_s": [seconds per call], "outputs": [{"prompt_token_ids", "token_ids", "cached_tokens"}, ...] (the first
call), "repeat_outputs": [outputs of each later call], "prefix_caching": bool}.

A subprocess per engine: a vLLM engine holds process-wide state (its distributed group, the plugin registry), so
the tests start each engine in a fresh process. Greedy (temperature 0), float32, eager, no stop at eos, one CPU
thread, 1 GiB of KV cache.
"""
from __future__ import annotations

import json
import os
import sys
import time

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process
       "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_CPU_OMP_THREADS_BIND": "nobind",
       "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def main(spec_path: str, out_path: str) -> None:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    spec = json.loads(open(spec_path).read())
    t0 = time.perf_counter()
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], dtype="float32", max_model_len=1024, max_num_seqs=spec.get("max_num_seqs", 64),
              enforce_eager=True, seed=0, hf_overrides=spec.get("hf_overrides"),
              limit_mm_per_prompt=spec.get("limit_mm_per_prompt", {"image": 4}),
              **({"block_size": spec["block_size"]} if "block_size" in spec else {}))
    start = time.perf_counter() - t0
    requests = []
    for r in spec["requests"]:
        images = [Image.open(p).convert("RGB") for p in r["images"]]
        request = {"prompt": r["prompt"]}
        data = {}
        if images:
            data["image"] = images if len(images) > 1 else images[0]
        if "video" in r:
            data["video"] = (np.load(r["video"]["frames"]), r["video"]["metadata"])
        if data:
            request["multi_modal_data"] = data
        requests.append(request)
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    times, calls = [], []
    for _ in range(1 + spec.get("repeats", 0)):
        t1 = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        times.append(time.perf_counter() - t1)
        calls.append([{"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
                       "cached_tokens": o.num_cached_tokens or 0} for o in outputs])
    result = {"start_s": start, "generate_s": times, "outputs": calls[0], "repeat_outputs": calls[1:],
              "prefix_caching": bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
