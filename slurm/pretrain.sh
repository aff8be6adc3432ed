#!/bin/bash
# The body of every Slurm job. slurm/pretrain_vit{b,l,h}.sh and slurm/finetune.sh hold only their
# #SBATCH header (sbatch reads the directives from the submitted file) and run this with their recipe:
#   source slurm/pretrain.sh RECIPE [--config FILE] [key=value ...]
# The maescale command is `pretrain`, or the one MAESCALE_COMMAND names (slurm/finetune.sh:
# `MAESCALE_COMMAND=finetune source slurm/pretrain.sh ...`); both checkpoint, stop and resume alike.
# RECIPE is the default config (configs/pretrain/vit_*.yaml); a `--config FILE` of the user's
# replaces it, and key=value overrides go to `maescale pretrain` as they are. Another model is
# another wrapper: copy one, change its #SBATCH lines and its recipe.
#
# One `srun` starts `accelerate launch` once per node (slurm/node.sh); machine rank, main
# address and port and process count come from Slurm's environment. Stop signals:
#   USR1 (`#SBATCH --signal=B:USR1@180`, or `scancel --signal=USR1 --batch JOB`): the trainer
#        finishes its step, writes a checkpoint and exits; the job then requeues itself and
#        the requeued job resumes from that checkpoint (checkpoint.resume=auto).
#   TERM (preemption, scancel, time limit): the same stop, without a requeue of our own
#        (Slurm requeues a preempted --requeue job itself).
#
# Set for the run unless the command line sets them itself:
#   output_dir        $MAESCALE_OUTPUT_ROOT/<job name>, MAESCALE_OUTPUT_ROOT defaulting to
#                     $SCRATCH/maescale, or $HOME/scratch/maescale where SCRATCH is not set
#                     (checkpoints of the large models do not belong in the checkout). The same
#                     job name resumes from the same folder, requeued or submitted again.
#   data.num_workers  max(1, SLURM_CPUS_PER_TASK / processes per node - 1): one core per
#                     process for the trainer, the rest for its loader (only with --cpus-per-task)
#
# Environment knobs (sbatch passes the submitting shell's environment to the job, unless
# --export says otherwise):
#   MAESCALE_ENV_SETUP=FILE       sourced before Python starts, by the batch shell and again on
#                                 every node (slurm/node.sh): `module load ...`, activating a
#                                 virtual environment, NCCL settings. Sourced twice on the first
#                                 node, so it must be safe to source again; it must return 0.
#                                 With `sbatch --export=MAESCALE_ENV_SETUP=FILE` the job starts
#                                 from a clean environment and the hook makes it.
#   MAESCALE_OUTPUT_ROOT=DIR      parent of the run folders (default above)
#   MAESCALE_DEVICE=gpu|cpu       cpu: configs/accelerate/cpu.yaml, gloo, no GPU needed (default gpu)
#   MAESCALE_PROCS_PER_NODE=N     processes per node (default: GPUs on the node; 2 on cpu)
#   MAESCALE_ACCELERATE_CONFIG    accelerate launch config (default by device:
#                                 configs/accelerate/multi_gpu.yaml or cpu.yaml; the model is
#                                 wrapped or sharded according to parallel.strategy either way)
#   MAESCALE_PYTHON               Python with maescale installed (default: python3 on PATH)
#   MAESCALE_MAIN_PORT            rendezvous port on the first node (default from the job id)
#   MAESCALE_STOP_GRACE=S         seconds the launcher waits for a stopping trainer (default 150)

maescale_fail() { echo "maescale slurm: error: $*" >&2; exit 2; }

maescale_log() { echo "[maescale slurm $(date +%H:%M:%S)] $*"; }

maescale_procs_per_node() {
  if [ -n "${MAESCALE_PROCS_PER_NODE:-}" ]; then echo "$MAESCALE_PROCS_PER_NODE"; return; fi
  if [ "${MAESCALE_DEVICE:-gpu}" = cpu ]; then echo 2; return; fi
  # SLURM_GPUS_PER_NODE may carry a type ("h100:8"); keep the count.
  local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  gpus=${gpus##*:}
  [ "${gpus:-0}" -gt 0 ] 2>/dev/null \
    || maescale_fail "no GPUs allocated: request --gpus-per-node, or run on CPU with MAESCALE_DEVICE=cpu"
  echo "$gpus"
}

maescale_accelerate_config() {
  if [ -n "${MAESCALE_ACCELERATE_CONFIG:-}" ]; then echo "$MAESCALE_ACCELERATE_CONFIG"
  elif [ "${MAESCALE_DEVICE:-gpu}" = cpu ]; then echo configs/accelerate/cpu.yaml
  else echo configs/accelerate/multi_gpu.yaml; fi
}

# maescale_has_override KEY ARGS...: whether the command line sets KEY (as KEY=value).
maescale_has_override() {
  local key=$1 arg
  shift
  for arg in "$@"; do [[ $arg == "$key="* ]] && return 0; done
  return 1
}

# Forward a stop signal to the training step. srun passes USR1 on to its tasks; a TERM sent
# to srun would make it kill them at once, so every stop travels as USR1.
maescale_on_signal() {
  maescale_stop_signal=$1
  maescale_signal_arrived=1
  maescale_log "got SIG$1: asking the trainer to checkpoint and stop"
  if [ -n "${maescale_srun_pid:-}" ]; then kill -USR1 "$maescale_srun_pid" 2>/dev/null || true; fi
}

# Wait for srun; a trapped signal interrupts `wait`, so wait again until srun has really ended.
maescale_wait_srun() {
  local rc
  while :; do
    maescale_signal_arrived=
    wait "$maescale_srun_pid"
    rc=$?
    [ -n "$maescale_signal_arrived" ] && [ "$rc" -gt 128 ] && continue
    return "$rc"
  done
}

# maescale_run RECIPE [--config FILE] [key=value ...]
maescale_run() {
  local recipe=$1
  shift
  local procs config head port nodes workers root
  local derived=()
  procs=$(maescale_procs_per_node) || exit 2  # the message is already on stderr
  config=$(maescale_accelerate_config)
  nodes=${SLURM_NNODES:-1}
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  port=${MAESCALE_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  [ -f "$config" ] || maescale_fail "accelerate config not found: $config"
  [ -f "$recipe" ] || maescale_fail "recipe not found: $recipe"

  if ! maescale_has_override output_dir "$@"; then
    root=${MAESCALE_OUTPUT_ROOT:-${SCRATCH:-${HOME:?neither MAESCALE_OUTPUT_ROOT, SCRATCH nor HOME is set}/scratch}/maescale}
    derived+=("output_dir=$root/${SLURM_JOB_NAME//\//_}")
    maescale_log "run folder: ${derived[-1]#output_dir=} (pass output_dir=... or set MAESCALE_OUTPUT_ROOT to move it)"
  fi
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && ! maescale_has_override data.num_workers "$@"; then
    workers=$((SLURM_CPUS_PER_TASK / procs - 1))
    [ "$workers" -ge 1 ] || workers=1
    derived+=("data.num_workers=$workers")
    maescale_log "data.num_workers=$workers: $SLURM_CPUS_PER_TASK CPUs per node / $procs process(es), one core each for the trainer"
  fi

  export MAESCALE_NODE_CONFIG=$config MAESCALE_NODE_PROCS=$procs MAESCALE_NODE_TOTAL=$((nodes * procs))
  export MAESCALE_NODE_HEAD=$head MAESCALE_NODE_PORT=$port
  # The launcher (torch elastic agent) passes these signals on to the trainer processes and
  # waits this long for them to checkpoint before it kills them.
  export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${MAESCALE_STOP_GRACE:-150}
  export PYTHONUNBUFFERED=1

  maescale_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $procs process(es), main $head:$port, $config"
  maescale_log "$maescale_command --config $recipe $* ${derived[*]}"
  maescale_stop_signal=
  trap 'maescale_on_signal USR1' USR1
  trap 'maescale_on_signal TERM' TERM
  # srun (since Slurm 22.05) does not inherit --cpus-per-task from the job: pass it on.
  # --export=ALL: the node tasks get this shell's environment (the variables above, the hook's)
  # even where the job was submitted with --export=NONE or a list, which srun would inherit
  # through SLURM_EXPORT_ENV and start the tasks with nothing.
  srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash slurm/node.sh "$maescale_command" --config "$recipe" "$@" "${derived[@]}" &
  maescale_srun_pid=$!
  local rc=0
  maescale_wait_srun || rc=$?
  trap - USR1 TERM
  maescale_log "training step ended with exit code $rc"
  if [ "$maescale_stop_signal" = USR1 ] && [ "$rc" -ne 0 ]; then
    maescale_log "requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || maescale_log "scontrol requeue failed; resubmit to resume"
  fi
  return "$rc"
}

[ -n "${SLURM_JOB_ID:-}" ] || maescale_fail "run this script with sbatch (SLURM_JOB_ID is not set)"
[ $# -ge 1 ] || maescale_fail "usage: slurm/pretrain.sh RECIPE [--config FILE] [key=value ...]"
maescale_command=${MAESCALE_COMMAND:-pretrain}
case $maescale_command in
  pretrain|finetune) ;;
  *) maescale_fail "MAESCALE_COMMAND=$maescale_command: the jobs run pretrain or finetune" ;;
esac
# The checkout this file is in (sbatch runs a copy of the wrapper, which found it through
# MAESCALE_ROOT or the submission folder).
MAESCALE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) \
  || maescale_fail "cannot find the repository of ${BASH_SOURCE[0]}"
# The environment hook, sourced here at the top level (in a function, `declare` would make its
# variables local), before anything reads the variables it may set.
if [ -n "${MAESCALE_ENV_SETUP:-}" ]; then
  # A relative path is relative to the folder the job was submitted from; the nodes get it absolute.
  [[ $MAESCALE_ENV_SETUP == /* ]] || MAESCALE_ENV_SETUP=${SLURM_SUBMIT_DIR:-$PWD}/$MAESCALE_ENV_SETUP
  export MAESCALE_ENV_SETUP
  [ -f "$MAESCALE_ENV_SETUP" ] || maescale_fail "MAESCALE_ENV_SETUP: no such file: $MAESCALE_ENV_SETUP"
  maescale_log "sourcing the environment hook $MAESCALE_ENV_SETUP"
  # shellcheck disable=SC1090
  source "$MAESCALE_ENV_SETUP" \
    || maescale_fail "the environment hook $MAESCALE_ENV_SETUP returned $? on $(hostname)"
fi
cd "$MAESCALE_ROOT" || maescale_fail "cannot enter $MAESCALE_ROOT"
export MAESCALE_ROOT
maescale_run "$@"
