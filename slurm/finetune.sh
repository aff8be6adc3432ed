#!/bin/bash
# MAE fine-tuning (maescale finetune), recipe configs/finetune/vit_b.yaml: 2 nodes x 8 GPUs, 64 images
# per GPU = the paper's global batch of 1024. From the repository root, in the environment that has
# maescale (or with MAESCALE_ENV_SETUP naming a file that makes it):
#   sbatch slurm/finetune.sh encoder.ckpt=/scratch/maescale/mae-vitb/checkpoints/step_XXXXXXXX data.path=...
#   sbatch slurm/finetune.sh --config configs/finetune/vit_l.yaml encoder.ckpt=... parallel.strategy=fsdp2
#   sbatch slurm/finetune.sh encoder.ckpt=null encoder.model=mae_vit_base_patch16   # from scratch
# The job checkpoints every checkpoint.every_steps and at the time-limit warning, requeues itself and
# resumes (checkpoint.resume=auto), like pretraining. The body is slurm/pretrain.sh: signals and
# requeue, the environment hook, the run folder ($SCRATCH/maescale/<job name> unless output_dir=...),
# the loader workers. See docs/SLURM.md. Log: logs/slurm/<job name>-<job id>.out
#
# Your site's partition and account: remove one '#' and fill in (or pass them to sbatch).
##SBATCH --partition=gpu
##SBATCH --account=my_project
#SBATCH --job-name=mae-finetune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
# 88 CPUs = 8 processes x (1 for the trainer + 10 loader workers).
#SBATCH --cpus-per-task=88
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/slurm/%x-%j.out
MAESCALE_COMMAND=finetune source "${MAESCALE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/pretrain.sh" \
  configs/finetune/vit_b.yaml "$@"
