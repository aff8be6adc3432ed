#!/usr/bin/env bash
# One-GPU check, under 8 minutes on an H100/H200 (bf16; sections in order of importance, each
# with its own time limit, so a slow compile cannot cost the earlier results):
#   1. sweep:   ViT-B/L/H eager at batch 128/256/512: images/s, MFU, peak memory; best batch each
#   2. encoder: encoder-only vs mask tokens in the encoder, ViT-L and ViT-H, batch 64
#   3. fsdp2:   FSDP2 over one GPU at the best batch (bf16 parameters, fp32 reduction)
#   4. best:    plain step at the best batch, eager vs torch.compile, interleaved
#   5. masking noise: the device-side hash vs per-sample host generators (seconds)
# Results: OUT_DIR/table.md (Markdown) and OUT_DIR/results.jsonl.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# GPU_CHECK_ARGS adds arguments to every section (a test runs it on CPU with a tiny model).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"
read -r -a extra <<< "${GPU_CHECK_ARGS:-}"
section() { timeout "$2" python benchmarks/gpu_suite.py "$1" --out "$out" "${@:3}" "${extra[@]}" || echo "section $1 ended with status $?" | tee -a "$out/table.md"; }
section sweep 100
section encoder 80 --models mae_vit_large_patch16 mae_vit_huge_patch14
section fsdp2 100
section best 170
timeout 30 python benchmarks/mask_noise.py | tee -a "$out/table.md"
echo "done" | tee -a "$out/table.md"
