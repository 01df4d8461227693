"""`dstp speed`: time and peak memory of generate() and the engine (lab/bench/speed/); speed.json in --out."""
from __future__ import annotations

import json
import os

from dstp.lab.bench.speed.config import SCENARIOS
from dstp.lab.bench.speed.report import print_speed
from dstp.lab.bench.speed.runner import run_speed


def add_parser(sub) -> None:
    s = sub.add_parser("speed", help="time and peak memory: generate() (dynamic cache; static cache, compiled) vs the "
                                     "engine unpruned, FastV and FastV + DSTP, eager and compiled, in an "
                                     "overhead-bound, a kv-bound and a weight-bound scenario, or on a model built "
                                     "from a published config.json (real)")
    s.add_argument("--scenario", choices=["overhead-bound", "kv-bound", "weight-bound", "both", "all", "real"],
                   default=None, help="default: all (overhead-bound, kv-bound and weight-bound); both: kv-bound and "
                                      "weight-bound; real with --model-config")
    s.add_argument("--model-config", default=None, metavar="PATH",
                   help="the real scenario: a published config.json (or its folder) of Qwen3-VL, Qwen2.5-VL or "
                        "LLaVA-1.5; its model at full depth and width with random weights, batch 1, one image")
    s.add_argument("--image", default=None, metavar="WxH",
                   help="real: the image size the family's processor is given (default 1280x960)")
    s.add_argument("--layers", type=int, default=None, help="real: this many LLM layers instead of the config's")
    s.add_argument("--out", default="results", help="folder for speed.json (and --profile tables)")
    s.add_argument("--repeats", type=int, default=None, help="timed runs per row (default: kv-bound 5, weight-bound "
                                                             "1, real 1)")
    s.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default: kv-bound 32, "
                                                                "weight-bound 1024, real 128)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--small", action="store_true", help="small shapes of the synthetic scenarios, for a quick look")
    s.add_argument("--sync-debug", action="store_true", help="count host synchronisations per decoding step "
                                                             "(CUDA: with torch.cuda.set_sync_debug_mode)")
    s.add_argument("--profile", action="store_true", help="a torch.profiler table of one run of each DSTP row")
    s.add_argument("--no-compile", action="store_true", help="hf_generate_static without the torch.compile that "
                                                             "transformers applies to it (its compile config)")
    s.add_argument("--compile-backend", default="inductor", metavar="NAME",
                   help="torch.compile backend of the compiled rows (default inductor; eager: dynamo's graph run as "
                        "traced, no code generated: a quick check that the rows compile)")
    s.set_defaults(run=run)


def run(args) -> int:
    scenario = args.scenario or ("real" if args.model_config is not None else "all")
    scenarios = {"all": tuple(SCENARIOS), "both": ("kv-bound", "weight-bound")}.get(scenario, (scenario,))
    result = run_speed(scenarios, device=args.device, dtype=args.dtype, small=args.small, repeats=args.repeats,
                       new_tokens=args.new_tokens, sync_debug=args.sync_debug,
                       profile_dir=args.out if args.profile else None, model_config=args.model_config,
                       image=args.image, layers=args.layers, compile_static=not args.no_compile,
                       compile_backend=args.compile_backend)
    print_speed(result)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "speed.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0
