# Started by slurm/common.sh through srun, once per node: `accelerate launch` of this node's
# trainer processes. The node's rank is SLURM_NODEID; everything else comes from common.sh.
#   bash slurm/node.sh <maescale command> [args...]
set -euo pipefail
exec "${MAESCALE_PYTHON:-python3}" -m accelerate.commands.launch \
  --config_file "$MAESCALE_NODE_CONFIG" \
  --num_machines "${SLURM_NNODES:-1}" \
  --machine_rank "$SLURM_NODEID" \
  --num_processes "$MAESCALE_NODE_TOTAL" \
  --main_process_ip "$MAESCALE_NODE_HEAD" \
  --main_process_port "$MAESCALE_NODE_PORT" \
  -m maescale "$@"
