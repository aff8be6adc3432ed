#!/bin/bash
# ViT-L/16 MAE pretraining on 8 nodes x 8 GPUs (64 per GPU = effective batch 4096), recipe in configs/pretrain/vit_l.yaml.
# Submit from the repository root, in the environment that has maescale installed:
#   sbatch slurm/pretrain_vitl.sh [--config FILE] [key=value ...]
#   sbatch --nodes=2 slurm/pretrain_vitl.sh train.accum_iter=4      # command-line options win
#   MAESCALE_DEVICE=cpu sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 slurm/pretrain_vitl.sh ...
# The job requeues itself before its time limit and resumes from its last checkpoint;
# see slurm/common.sh for the signals and environment knobs. Log: logs/slurm/<name>-<job id>.out
#SBATCH --job-name=mae-vitl
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/slurm/%x-%j.out

source "${MAESCALE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
run_pretrain configs/pretrain/vit_l.yaml "$@"
