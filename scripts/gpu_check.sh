#!/usr/bin/env bash
# The GPU check (issue "Runs where users install it", item 6). On a machine with a CUDA GPU, from anywhere:
#   bash scripts/gpu_check.sh [OUT]          (OUT defaults to results/gpu, relative to the repo root)
# 1. OUT/machine.txt: the GPU, torch / CUDA / transformers versions, whether torch.compile can run here.
# 2. OUT/fidelity_cuda.json: engine vs transformers generate() on a tiny random-weight model of every family,
#    float32 and bfloat16, on CUDA (`dstp fidelity --device cuda --dtypes float32,bfloat16`).
# 3. OUT/speed.json: `dstp speed --device cuda --dtype bfloat16 --sync-debug` on the `real` scenario: a random-weight
#    model built from Qwen/Qwen3-VL-4B-Instruct's published config.json (tests/real_configs/) at full depth and
#    width (36 x 2560 LLM, 24-block ViT, 4.4B parameters), one 1280x960 image (1,200 visual tokens), batch 1,
#    128 new tokens, one timed run per row; host synchronisations counted per decoding step (torch.cuda's
#    sync-debug mode next to dstp's own count).
#
# Engine v2 (2026-12-05): the speed run now also has the engine's four compiled rows (torch.compile, CUDA graphs via
# mode="reduce-overhead"), each compiled in its first run, and VisionPulse's two rows (eager and compiled, issue 28);
# the estimate below predates them and was not redone: it
# has still never run on a GPU. Issue 24's own GPU check (batch 1 and 8, 1,024 visual tokens, 512 new tokens, against
# the bandwidth limit) is not built: the real scenario runs batch 1 only.
# Time on one H100, estimated (not yet run on one): about 7 minutes at most, 3-5 likely. Basis, conservative:
# - decoding is host-bound at batch 1: a step reads 8.2 GB (3.63B LLM weights + the 389M-parameter LM head at bf16,
#   K/V 0.2 GB), 2.5 ms at the H100 SXM's 3.35 TB/s (4 ms on PCIe), while it launches 2,000-2,500 kernels (aten ops
#   that are not views, counted per step on this 36-layer structure: generate() 2,027, engine 2,096, FastV 2,102,
#   DSTP store 2,223, recompute 2,542); at 20-25 us each (eager PyTorch + the Python around it): 50-60 ms a step;
# - speed: 6 rows x 2 runs (a tracked warm-up, one timed) x 127 steps x 60 ms = 91 s; --sync-debug: 4 engine rows
#   x 65 steps under a Python dispatch mode (3,500-4,300 ops a step) at ~150 ms = 39 s; 16 prefills (ViT 24 blocks
#   over 4,800 patches + 1,226 LLM tokens, about 15 TFLOP: < 0.1 s of GPU) at 1 s = 16 s; building the model on
#   the GPU 30 s; transformers' torch.compile of the static-cache decode step (one graph, no graph breaks on a
#   4-layer model of this structure, checked on CPU with torch 2.11 / transformers 5.17) budgeted at 180 s;
# - fidelity: 10 cases (5 families x 2 dtypes) x 6 runs of 32 tokens on 4-layer models, with CUDA's start, 50 s;
#   three python starts 30 s.
# Sum: about 440 s. 256 new tokens would add about 90 s more decoding, too close to 10 minutes.
#
# What it needs: python3 (>= 3.10) with torch (2.11 tested at the floor) built with CUDA, transformers (5.17), and
# their own dependencies; nothing is installed and nothing is downloaded (HF_HUB_OFFLINE=1): dstp runs from src/
# through PYTHONPATH. Beyond torch and transformers, dstp imports only `rich` on these paths (a dependency of
# transformers 5's `typer`, so normally present). hf_generate_static is compiled by transformers (torch.compile,
# CUDA graphs), which needs triton (a torch dependency), a C compiler and Python's headers (triton builds its
# launcher); without them that row runs uncompiled (--no-compile) and machine.txt says so.
# PY=/path/to/python overrides python3.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${1:-results/gpu}
PY=${PY:-python3}
CONFIG=tests/real_configs/Qwen--Qwen3-VL-4B-Instruct/config.json
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
fail() { echo "gpu_check: $*" >&2; exit 2; }

command -v "$PY" >/dev/null 2>&1 || fail "no $PY on PATH (set PY=/path/to/python)"
[ -f "$CONFIG" ] || fail "$CONFIG is missing (the published Qwen3-VL-4B config this check builds its model from)"
# packages first, one line; then CUDA; then dstp itself from src/
"$PY" - <<'PY' || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "rich") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing python package(s): {', '.join(missing)} (needs torch with CUDA, transformers "
             f"and rich; this script installs nothing)")
if sys.version_info < (3, 10):
    sys.exit(f"gpu_check: python {sys.version.split()[0]} is too old (dstp needs >= 3.10)")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (torch.version.cuda = {torch.version.cuda})")
try:
    import dstp.lab.bench.fidelity, dstp.lab.bench.speed.runner, dstp.lab.cli.main  # noqa: E401, F401
except Exception as e:  # noqa: BLE001
    sys.exit(f"gpu_check: cannot import dstp from src/: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
PY

mkdir -p "$OUT" || fail "cannot create $OUT"
rm -f "$OUT/machine.txt" "$OUT/fidelity_cuda.json" "$OUT/speed.json"
# can transformers' torch.compile of the static-cache generate() run here? (triton + a C compiler + Python.h)
COMPILE_NOTE=$("$PY" - <<'PY'
import importlib.util, os, shutil, sysconfig
why = []
if importlib.util.find_spec("triton") is None:
    why.append("no triton")
if not any(shutil.which(c) for c in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang"))):
    why.append("no C compiler (cc, gcc, clang or $CC)")
if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
    why.append("no Python.h (python3-dev)")
print("; ".join(why))
PY
)
SPEED_FLAGS=()
if [ -n "$COMPILE_NOTE" ]; then
    echo "gpu_check: torch.compile cannot run here ($COMPILE_NOTE): hf_generate_static runs uncompiled" >&2
    SPEED_FLAGS+=(--no-compile)
fi

{
    "$PY" - <<'PY'
import os, platform, sys, torch, transformers
p = torch.cuda.get_device_properties(0)
print("gpu:", torch.cuda.get_device_name(0), f"({p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible)")
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "transformers", transformers.__version__)
print("python", sys.version.split()[0], platform.machine(), platform.platform(), f"{os.cpu_count()} CPUs")
PY
    echo "torch.compile for hf_generate_static: ${COMPILE_NOTE:-available}"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
        --format=csv,noheader
} | tee "$OUT/machine.txt"

START=$SECONDS
"$PY" -m dstp.lab.cli fidelity --device cuda --dtypes float32,bfloat16 --out "$OUT/fidelity_cuda.json"
FID=$?  # 1: some family not token-identical / not within 1e-5 (a finding, recorded in the JSON); 2: an error
echo "gpu_check: fidelity exit $FID after $((SECONDS - START)) s"
"$PY" -m dstp.lab.cli speed --model-config "$CONFIG" --device cuda --dtype bfloat16 --sync-debug \
    ${SPEED_FLAGS[@]+"${SPEED_FLAGS[@]}"} --out "$OUT"
SPEED=$?
echo "gpu_check: speed exit $SPEED after $((SECONDS - START)) s in all"
[ -f "$OUT/fidelity_cuda.json" ] && echo "wrote $OUT/fidelity_cuda.json"
[ -f "$OUT/speed.json" ] && echo "wrote $OUT/speed.json"
echo "wrote $OUT/machine.txt"
[ "$FID" -eq 0 ] && [ "$SPEED" -eq 0 ]
