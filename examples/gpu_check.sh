#!/usr/bin/env bash
# The GPU check: plain vs Medusa greedy on a GPU backend (CUDA, NV, AMD or METAL), side by side in one process, with
# the verify-cost curve; exits non-zero unless every prompt's tokens are identical. A few minutes on a fresh machine.
# Usage, from anywhere:  examples/gpu_check.sh [DEVICE]      (default: the first GPU backend that opens)
# Writes gpu-check.json and gpu-check.md in the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup
device=$(.venv/bin/python - "${1:-}" <<'PY'
import sys
from exo_tinygrad_medusa.model.device import choose_device
device, reason = choose_device(sys.argv[1] or None)
if device.split(":")[0] in ("CPU", "CLANG", "LLVM", "CL"):
    sys.exit(f"gpu_check: no GPU backend here ({reason}); name one, e.g. examples/gpu_check.sh CUDA")
print(device)
PY
)
echo "gpu_check: $device"
.venv/bin/exo-medusa bench smollm2-135m --device "$device" --medusa-enabled --limit 8 --max-generate-tokens 64 \
  --cost-sizes 1,2,4,8,16,32 --cost-reps 5 --prefill-tokens 512 --json gpu-check.json | tee gpu-check.md
