#!/usr/bin/env bash
# The real trainer on one GPU: ViT-L, bf16, synthetic 224 px data, under FSDP2 (world size 1)
# and plain DDP, compared with the bare training step at the same batch. Under 5 minutes.
#   bash benchmarks/gpu_trainer.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-gpu_trainer_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
common=(model.name=mae_vit_large_patch16 data.kind=synthetic data.synthetic_size=16384 data.batch_size=128
        data.num_workers=12 train.precision=bf16 train.max_steps=60 train.log_every=20 checkpoint.every_steps=1000
        train.figure_every=1000)
for strategy in fsdp2 ddp; do
  timeout 240 python -m torch.distributed.run --nproc_per_node 1 --master_port 29700 -m maescale pretrain \
    "${common[@]}" parallel.strategy=$strategy output_dir="$out/run_$strategy" 2>&1 | grep -E "process|finished|Error" | tee -a "$out/log.txt"
  cp "$out/run_$strategy/metrics.jsonl" "$out/metrics_$strategy.jsonl" 2>/dev/null
done
timeout 120 python benchmarks/throughput.py --models mae_vit_large_patch16 --batch-sizes 128 --precision bf16 --steps 20 --warmup 5 | tee -a "$out/log.txt"
