#!/usr/bin/env bash
# One-GPU check, under 8 minutes on an H100/H200: bf16 training-step throughput and MFU of
# ViT-B/L/H (eager at two batch sizes, compiled at one), results as Markdown and JSONL.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"
run() { timeout "$1" python benchmarks/throughput.py --jsonl "$out/results.jsonl" --precision bf16 --steps 20 --warmup 5 "${@:2}" | tee -a "$out/table.md"; }
run 150 --models mae_vit_base_patch16 mae_vit_large_patch16 mae_vit_huge_patch14 --batch-sizes 64 256
run 300 --models mae_vit_large_patch16 mae_vit_huge_patch14 --batch-sizes 256 --compile on
echo "done" | tee -a "$out/table.md"
