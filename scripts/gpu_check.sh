#!/usr/bin/env bash
# The GPU check (issue: the real path, item 9). On a machine with a CUDA GPU, from the repo root:
#   bash scripts/gpu_check.sh [OUT]          (OUT defaults to results/gpu)
# 1. engine vs transformers generate() on every family, float32 and bfloat16, on CUDA -> OUT/fidelity_cuda.json
# 2. dstp speed on CUDA in bfloat16, both scenarios, with host synchronisations counted per decoding step
#    (torch.cuda.set_sync_debug_mode: expect loop 1 (the stop check) + 1 inside DSTP's step) -> OUT/speed.json
# It needs the project's venv (make setup) or an environment with dstp installed; it downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu}
DSTP=${DSTP:-.venv/bin/dstp}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" - <<'PY' | tee "$OUT/machine.txt"
import platform, torch, transformers
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      platform.machine())
PY
"$DSTP" fidelity --device cuda --dtypes float32,bfloat16 --out "$OUT/fidelity_cuda.json"
"$DSTP" speed --device cuda --dtype bfloat16 --sync-debug --out "$OUT"
echo "wrote $OUT/fidelity_cuda.json and $OUT/speed.json"
