#!/usr/bin/env bash
# The one-GPU check, under 8 minutes on an H100/H200. Sections in order of importance, each with
# its own time limit, so a slow compile or a hung test cannot cost the later results:
#   1. tests:   the CUDA-marked tests, the backend choice, and the 2-process tests on the gloo fallback
#   2. sweep:   ViT-B/L/H eager bf16 at batch 64/128/256: images/s, MFU, peak memory; best batch each
#   3. best:    plain step at the best batch: eager vs torch.compile (whole model, per block)
#   4. fsdp2:   FSDP2 units over one GPU at the best batch (maescale's cut: bf16 params, fp32
#               reduction): FSDP2's own cost, which the trainer avoids on one process
#   5. trainer: `maescale pretrain` (ViT-L bf16, synthetic data) under DDP and FSDP2 vs the bare step
#               (on one process parallel.strategy=fsdp2 trains the model whole: the line says so)
#   6. host:    the host-overhead table on this machine's CPU (benchmarks/host_overhead.py)
#   7. masking noise: the device-side hash vs per-sample host generators
# Results: OUT_DIR/table.md (Markdown), OUT_DIR/results.jsonl, OUT_DIR/tests.txt, OUT_DIR/trainer/.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# GPU_CHECK_ARGS adds arguments to every gpu_suite section (a test runs them on CPU with a tiny model).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"
read -r -a extra <<< "${GPU_CHECK_ARGS:-}"
note() { echo "$1" | tee -a "$out/table.md"; }
section() { timeout "$2" python benchmarks/gpu_suite.py "$1" --out "$out" "${@:3}" "${extra[@]}" || note "section $1 ended with status $?"; }

timeout 100 python -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_parallel.py \
  "tests/test_distributed.py::test_two_processes_match_one" -k "not zero" 2>&1 | tail -25 > "$out/tests.txt" \
  || note "tests ended with status $?"
tail -3 "$out/tests.txt"
section sweep 70 --batch-sizes 64 128 256
section best 90
section fsdp2 35
mkdir -p "$out/trainer"
common=(model.name=mae_vit_large_patch16 data.kind=synthetic data.synthetic_size=16384 data.batch_size=128
        data.num_workers=8 train.precision=bf16 train.max_steps=40 train.log_every=10 checkpoint.every_steps=1000)
for strategy in ddp fsdp2; do
  timeout 50 python -m torch.distributed.run --nproc_per_node 1 --master_port 29700 -m maescale pretrain \
    "${common[@]}" parallel.strategy=$strategy output_dir="$out/trainer/$strategy" 2>&1 \
    | grep -E "process|Error" | tee -a "$out/trainer/log.txt"
done
timeout 25 python benchmarks/throughput.py --models mae_vit_large_patch16 --batch-sizes 128 --precision bf16 \
  --steps 20 --warmup 5 | tee -a "$out/trainer/log.txt"
OMP_NUM_THREADS=1 timeout 35 python benchmarks/host_overhead.py --models mae_vit_micro_patch4 mae_vit_tiny_patch4 \
  --batch-sizes 2 --world-sizes 1 --candidates plain fsdp2_before fsdp2 --rounds 3 | tee -a "$out/table.md"
timeout 15 python benchmarks/mask_noise.py | tee -a "$out/table.md"
note "done"
