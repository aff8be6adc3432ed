# Shared logic of the slurm/pretrain_*.sh batch scripts (sourced, not run).
#
# One `srun` starts `accelerate launch` once per node (slurm/node.sh); machine rank, main
# address and port and process count come from Slurm's environment. Stop signals:
#   USR1 (`#SBATCH --signal=B:USR1@180`, or `scancel --signal=USR1 --batch JOB`): the trainer
#        finishes its step, writes a checkpoint and exits; the job then requeues itself and
#        the requeued job resumes from that checkpoint (checkpoint.resume=auto).
#   TERM (preemption, scancel, time limit): the same stop, without a requeue of our own
#        (Slurm requeues a preempted --requeue job itself).
# Environment knobs (sbatch passes the submitting shell's environment to the job):
#   MAESCALE_DEVICE=gpu|cpu       cpu: configs/accelerate/cpu.yaml, gloo, no GPU needed (default gpu)
#   MAESCALE_PROCS_PER_NODE=N     processes per node (default: GPUs on the node; 2 on cpu)
#   MAESCALE_ACCELERATE_CONFIG    accelerate launch config (default by device)
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
  else echo configs/accelerate/ddp.yaml; fi
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

# run_pretrain DEFAULT_CONFIG [--config FILE] [key=value ...]
run_pretrain() {
  local default_config=$1
  shift
  [ -n "${SLURM_JOB_ID:-}" ] || maescale_fail "run this script with sbatch (SLURM_JOB_ID is not set)"
  cd "$MAESCALE_ROOT" || maescale_fail "cannot enter $MAESCALE_ROOT"
  local procs config head port nodes
  procs=$(maescale_procs_per_node) || exit 2  # the message is already on stderr
  config=$(maescale_accelerate_config)
  nodes=${SLURM_NNODES:-1}
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  port=${MAESCALE_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  [ -f "$config" ] || maescale_fail "accelerate config not found: $config"

  export MAESCALE_NODE_CONFIG=$config MAESCALE_NODE_PROCS=$procs MAESCALE_NODE_TOTAL=$((nodes * procs))
  export MAESCALE_NODE_HEAD=$head MAESCALE_NODE_PORT=$port
  # The launcher (torch elastic agent) passes these signals on to the trainer processes and
  # waits this long for them to checkpoint before it kills them.
  export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${MAESCALE_STOP_GRACE:-150}
  export PYTHONUNBUFFERED=1

  maescale_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $procs process(es), main $head:$port, $config"
  maescale_log "pretrain --config $default_config $*"
  maescale_stop_signal=
  trap 'maescale_on_signal USR1' USR1
  trap 'maescale_on_signal TERM' TERM
  # srun (since Slurm 22.05) does not inherit --cpus-per-task from the job: pass it on.
  srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash slurm/node.sh pretrain --config "$default_config" "$@" &
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

MAESCALE_ROOT=${MAESCALE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$MAESCALE_ROOT/slurm/node.sh" ] \
  || maescale_fail "$MAESCALE_ROOT is not the maescale repository: submit from its root or set MAESCALE_ROOT"
