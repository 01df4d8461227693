"""Throughput of vLLM with and without the dstp plugin's pruning, tiny random models on CPU (docs/vllm.md).

    PYTHONPATH=tests .venv-vllm/bin/python tests_vllm/throughput.py [--families llava,qwen2_5_vl,qwen3_vl]
        [--batches 16,32,64] [--configs none,uniform,divprune] [--retention 0.25] [--new-tokens 32] [--repeats 3]
        [--lm tiny|small] [--out FILE.json]

(PYTHONPATH=tests: tiny_models.py builds on tests/hub_fixtures.py, which pytest finds through its `pythonpath`.)

Per family, a checkpoint whose images are 576 visual tokens (LLaVA-1.5's count; Qwen-VL images of 192x192 pixels)
with the tiny LLM of tests_vllm/tiny_models.py (`--lm small`: 4 layers, hidden 512); per configuration (`none`:
the plugin loaded, no `dstp` key), one engine in a subprocess, float32, eager, one CPU thread, greedy,
`--new-tokens` tokens per request with no stop at eos; per batch size B, B requests with B different images through
one `LLM.generate` call, timed after a warm-up call: the median of `--repeats`. Prefix caching and the processor
cache are off and no image is sent twice, so nothing of a timed call comes from a cache. requests/s = B / t and generated
tokens/s = B * new tokens / t; t covers the whole call (processor, vision encoder, selection, prefill, decoding).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
VISUAL_TOKENS = 576
IMAGE_SIZE = {"llava": (200, 160), "qwen2_5_vl": (192, 192), "qwen3_vl": (192, 192)}
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def worker(spec_path: str, out_path: str) -> None:
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    spec = json.loads(pathlib.Path(spec_path).read_text())
    from PIL import Image
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    # no prefix cache, no processor cache, and every call gets images it has not seen: each timed call runs the
    # whole request (processor, encoder, selection, prefill, decoding), none of it served from a cache
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=1024, max_num_seqs=max(spec["batches"]),
              max_num_batched_tokens=65536, enforce_eager=True, seed=0, hf_overrides=spec["hf_overrides"],
              enable_prefix_caching=False, mm_processor_cache_gb=0)
    start = time.perf_counter() - t0
    requests = [{"prompt": spec["prompt"], "multi_modal_data": {"image": Image.open(p).convert("RGB")}}
                for p in spec["images"]]
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True)
    rows, fresh = [], iter(requests)
    for b in spec["batches"]:
        out = llm.generate([next(fresh) for _ in range(b)], params, use_tqdm=False)  # warm-up (+ prompt lengths)
        times = []
        for _ in range(spec["repeats"]):
            batch = [next(fresh) for _ in range(b)]
            t1 = time.perf_counter()
            llm.generate(batch, params, use_tqdm=False)
            times.append(time.perf_counter() - t1)
        rows.append({"batch": b, "seconds": times, "prompt_tokens": [len(o.prompt_token_ids) for o in out],
                     "new_tokens": [len(o.outputs[0].token_ids) for o in out]})
    pathlib.Path(out_path).write_text(json.dumps({"start_s": start, "rows": rows}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="llava,qwen2_5_vl,qwen3_vl")
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--configs", default="none,uniform,divprune")
    ap.add_argument("--retention", type=float, default=0.25)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lm", default="tiny", choices=["tiny", "small"], help="tiny_models.LMS")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    from conftest import QUESTION, chat_prompt  # tests_vllm's own: this script's folder is first on the path
    import tiny_models

    batches = [int(b) for b in args.batches.split(",")]
    results = {"machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} CPUs, 1 thread per engine",
               "lm": dict(tiny_models.LMS[args.lm]), "retention": args.retention, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for family in args.families.split(","):
            model = tiny_models.build(family, tmp / family, visual_tokens=VISUAL_TOKENS, lm_size=args.lm)
            n_images = sum(batches) * (1 + args.repeats)  # a fresh image for every request of every call
            images = tiny_models.sample_images(n_images, seed=1, sizes=[IMAGE_SIZE[family]] * n_images)
            paths = []
            for i, im in enumerate(images):
                paths.append(str(tmp / f"{family}-{i}.png"))
                im.save(paths[-1])
            for config in args.configs.split(","):
                over = None if config == "none" else {"dstp": {"method": config, "retention": args.retention}}
                spec = {"model": str(model), "hf_overrides": over, "prompt": chat_prompt(model, question=QUESTION),
                        "images": paths, "batches": batches, "new_tokens": args.new_tokens, "repeats": args.repeats}
                spec_path, out_path = tmp / "spec.json", tmp / "out.json"
                spec_path.write_text(json.dumps(spec))
                env = {**os.environ, **ENV}
                env.pop("VLLM_PLUGINS", None)
                proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path), str(out_path)],
                                      env=env, timeout=1800, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{family} {config}: engine failed:\n{proc.stderr[-3000:]}")
                out = json.loads(out_path.read_text())
                for row in out["rows"]:
                    t = statistics.median(row["seconds"])
                    b = row["batch"]
                    rec = {"family": family, "config": config, "batch": b, "seconds": row["seconds"],
                           "requests_per_s": b / t, "generated_tokens_per_s": sum(row["new_tokens"]) / t,
                           "prompt_tokens_per_request": statistics.mean(row["prompt_tokens"]),
                           "engine_start_s": out["start_s"]}
                    results["rows"].append(rec)
                    print(f"{family:11s} {config:9s} B={b:3d} {rec['requests_per_s']:8.2f} req/s "
                          f"{rec['generated_tokens_per_s']:9.1f} tok/s  prompt {rec['prompt_tokens_per_request']:.0f} "
                          f"tokens  (t={t:.2f}s, {', '.join(f'{s:.2f}' for s in row['seconds'])})", flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
