#!/usr/bin/env bash
# GPU benchmark of one node, in under 8 minutes, with no network: decode (DALI mixed/NVDEC), the paper-preset step
# (fp32, bf16, bf16 + channels_last, torch.compile; samples/s per GPU, peak memory), whether the DALI GPU loader keeps
# up with the step, the GPU/CPU pipeline parity check, and the paths only a GPU exercises (bench/gpu_paths.py: check
# on CUDA, the motion variant with channels_last, accumulation under DDP). Data: synthetic clips made on the node (flipray.synth.scenes).
#
#   bench/gpu.sh OUT_DIR               # writes OUT_DIR/gpu.json, gpu.log, nvidia-smi.txt
#   bench/gpu.sh --dry-run OUT_DIR     # tiny CPU settings (demo preset, 4 short clips): checks the script anywhere
#   PYTHON=/opt/venv/bin/python bench/gpu.sh OUT_DIR      # a python with flipray's pinned dependencies
#   bench/gpu.sh OUT_DIR --clips 128 --batches 16,32      # options after OUT_DIR go to python -m bench.gpu
#
# Then: python -m bench.project --cpu docs/bench-cpu.json --gpu OUT_DIR/gpu.json (docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); shift; fi
OUT=${1:?usage: bench/gpu.sh [--dry-run] OUT_DIR [bench.gpu options, e.g. --clips 128]}
shift
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE TQDM_DISABLE=1 PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi
# One deadline for everything (7.5 min): bench.gpu writes gpu.json after every part, so a cut-short run keeps
# what it measured. Its stderr goes to the terminal and to gpu.log.
status=0
timeout --kill-after=20 450 "$PYTHON" -m bench.gpu --out "$OUT" "${DRY[@]}" "$@" 2> >(tee "$OUT/gpu.log" >&2) || status=$?
wait  # for tee
if [[ $status -eq 124 || $status -eq 137 ]]; then echo "bench/gpu.sh: time limit reached; partial $OUT/gpu.json" >&2; fi
echo "bench/gpu.sh: $OUT/gpu.json (exit $status)" >&2
exit $status
