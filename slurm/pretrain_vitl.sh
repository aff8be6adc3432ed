#!/bin/bash
# ViT-L/16 MAE pretraining, recipe configs/pretrain/vit_l.yaml: 8 nodes x 8 GPUs, 64 images per
# GPU = effective batch 4096. From the repository root, in the environment that has maescale
# (or with MAESCALE_ENV_SETUP naming a file that makes it):
#   sbatch slurm/pretrain_vitl.sh [--config FILE] [key=value ...]
#   sbatch --nodes=2 slurm/pretrain_vitl.sh train.accum_iter=4      # command-line options win
# The body is slurm/pretrain.sh: signals and requeue, the environment hook MAESCALE_ENV_SETUP,
# the run folder ($SCRATCH/maescale/<job name> unless output_dir=...), the loader workers.
# See docs/SLURM.md. Log: logs/slurm/<job name>-<job id>.out
#
# Your site's partition and account: remove one '#' and fill in (or pass them to sbatch).
##SBATCH --partition=gpu
##SBATCH --account=my_project
#SBATCH --job-name=mae-vitl
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
# 88 CPUs = 8 processes x (1 for the trainer + 10 loader workers): data.num_workers=10, the recipe's.
#SBATCH --cpus-per-task=88
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/slurm/%x-%j.out
source "${MAESCALE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/pretrain.sh" configs/pretrain/vit_l.yaml "$@"
