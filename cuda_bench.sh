#!/usr/bin/env bash
# The rollout engine's device checks, in one run (README, "Benchmarks"), on one saved random model:
#   1. `bench.py decode`: our decoder against HF `generate` (base model, LoRA wrapped, LoRA merged);
#   2. `bench.py loop`: one Phase 0 iteration with our engine against the same iteration by hand with HF;
#   3. `bench.py qlora`: a 4-bit NF4 base under LoRA: load, a short rollout, one update step.
# Each writes OUT/<step>.json and OUT/<step>.txt; OUT/summary.txt gathers tokens/s, peak memory and ratios
# (`bench.py device`, DEVICE_RUNS, holds the sizes).
#
#   bash cuda_bench.sh [OUT]                       # CUDA: a Qwen2.5-1.5B-shaped model (28 layers, 1536 wide,
#                                                  # vocabulary 151,936), random weights, bf16; a few minutes
#   SIZE=tiny DEVICE=cpu bash cuda_bench.sh OUT    # the same steps at a tiny size, on CPU (tests/test_bench.py);
#                                                  # the QLoRA step then records that it needs CUDA
# Environment: DEVICE (cuda), SIZE (full | tiny), PYTHON (python). At full size the random model is saved to
# a temporary folder (~3.5 GB), deleted at the end.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/cuda_bench}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "${PYTHON:-python}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/device.txt"
"${PYTHON:-python}" bench.py device --device "${DEVICE:-cuda}" --size "${SIZE:-full}" --out "$OUT" 2> "$OUT/stderr.txt"
