# Started by slurm/pretrain.sh through srun, once per node: `accelerate launch` of this node's
# trainer processes. The node's rank is SLURM_NODEID; everything else comes from pretrain.sh.
#   bash slurm/node.sh <maescale command> [args...]
# The environment hook (MAESCALE_ENV_SETUP, made absolute by pretrain.sh) is sourced again here,
# on every node, before Python starts: `module load`, a virtual environment, node-local settings.
if [ -n "${MAESCALE_ENV_SETUP:-}" ]; then
  # shellcheck disable=SC1090
  source "$MAESCALE_ENV_SETUP" || {
    echo "maescale slurm: error: the environment hook $MAESCALE_ENV_SETUP returned $? on $(hostname)" >&2
    exit 2
  }
fi
set -euo pipefail
exec "${MAESCALE_PYTHON:-python3}" -m accelerate.commands.launch \
  --config_file "$MAESCALE_NODE_CONFIG" \
  --num_machines "${SLURM_NNODES:-1}" \
  --machine_rank "$SLURM_NODEID" \
  --num_processes "$MAESCALE_NODE_TOTAL" \
  --main_process_ip "$MAESCALE_NODE_HEAD" \
  --main_process_port "$MAESCALE_NODE_PORT" \
  -m maescale "$@"
