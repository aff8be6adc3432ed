#!/usr/bin/env bash
# The one-GPU check, under 8 minutes on an H100/H200. Sections in order of importance, each with
# its own time limit, so a slow compile or a hung test cannot cost the later results:
#   1. tests:   the whole suite, pytest-xdist over 8 workers (one test module per worker); a test
#               that cannot run here skips with its reason (pytest-xdist and pytest-timeout are
#               installed when missing; if that fails the suite runs in one process)
#   2. sweep:   ViT-B/L/H eager bf16 at batch 64/128/256: images/s, MFU, peak memory; best batch each
#   3. best:    plain step at the best batch: eager vs torch.compile (whole model, per block)
#   4. trainer: `maescale pretrain` (ViT-L bf16, synthetic data) under ddp and fsdp2 vs the bare step
#               (on one process both train the model whole: the strategy line says so)
#   5. host:    DDP vs the trainer's FSDP2 on 2 processes of this machine's CPU (benchmarks/host_overhead.py)
#   6. decode:  data.decode=gpu's batched decode + crop + flip + normalise vs one CPU worker core, images/s;
#               then `maescale pretrain` ViT-B on those JPEGs, decode=gpu vs cpu (8 workers): data_wait
#               per step (metrics.jsonl) and images/s
# Results: OUT_DIR/table.md (Markdown), OUT_DIR/results.jsonl, OUT_DIR/tests.txt and OUT_DIR/junit.xml
# (the suite), OUT_DIR/trainer/.
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
has() { python -c "import $1" 2>/dev/null; }

has xdist && has pytest_timeout || timeout 15 python -m pip install -q --disable-pip-version-check --retries 0 \
  --timeout 5 pytest-xdist pytest-timeout > "$out/pip.txt" 2>&1 || note "pip install ended with status $? (pip.txt)"
pytest_args=(-q -p no:cacheprovider --junitxml="$out/junit.xml")
if has xdist; then pytest_args+=(-n 8 --dist loadscope); fi
if has pytest_timeout; then pytest_args+=(--timeout 120); fi
# SIGINT, so that pytest still writes its summary and junit.xml when the limit ends it
timeout -s INT -k 10 150 python -m pytest "${pytest_args[@]}" tests > "$out/tests.txt" 2>&1 \
  || note "tests ended with status $?"
tail -3 "$out/tests.txt"
section sweep 55 --batch-sizes 64 128 256
section best 55
mkdir -p "$out/trainer"
common=(model.name=mae_vit_large_patch16 data.kind=synthetic data.synthetic_size=16384 data.batch_size=128
        data.num_workers=8 train.precision=bf16 train.max_steps=40 train.log_every=10 checkpoint.every_steps=1000)
for strategy in ddp fsdp2; do
  timeout 35 python -m torch.distributed.run --nproc_per_node 1 --master_port 29700 -m maescale pretrain \
    "${common[@]}" parallel.strategy=$strategy output_dir="$out/trainer/$strategy" 2>&1 \
    | grep -E "process|Error" | tee -a "$out/trainer/log.txt"
done
timeout 20 python benchmarks/throughput.py --models mae_vit_large_patch16 --batch-sizes 128 --precision bf16 \
  --steps 20 --warmup 5 | tee -a "$out/trainer/log.txt"
OMP_NUM_THREADS=1 timeout 20 python benchmarks/host_overhead.py --models mae_vit_tiny_patch4 --batch-sizes 2 \
  --world-sizes 2 --candidates ddp fsdp2 --rounds 3 | tee -a "$out/table.md"
section decode 30 --jpegs /tmp/maescale-photos --decode-images 1024
mkdir -p "$out/decode"
for decode in gpu cpu; do
  timeout 25 python -m maescale pretrain model.name=mae_vit_base_patch16 data.kind=folder \
    data.path=/tmp/maescale-photos data.decode=$decode data.batch_size=128 data.num_workers=8 train.precision=bf16 \
    train.max_steps=30 train.log_every=10 checkpoint.every_steps=1000 output_dir="$out/decode/$decode" > /dev/null 2>&1
  python -c "import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; \
print('decode=$decode', [(r['step'], round(r['data_wait'], 4), round(r['images_per_sec'])) for r in rows])" \
    "$out/decode/$decode/metrics.jsonl" 2>&1 | tee -a "$out/table.md"
done
note "done"
