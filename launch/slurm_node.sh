#!/usr/bin/env bash
# Run by srun on every node of launch/export.sbatch (which sets the FP8PB_* variables): this node's torchrun agent.
#   c10d    rendezvous at FP8PB_RDZV_HOST:FP8PB_PORT; torch numbers the nodes in the order of their host names
#   static  node rank = SLURM_NODEID, so global rank 0, the writer, runs on the job's first node
# Each rank's stdout/stderr goes to $FP8PB_LOG_DIR/node-<SLURM_NODEID>/<run>/attempt_0/<local rank>/ and, prefixed
# with its rank, to the node's log. launch/torchrun.py is torchrun with a one-line failure summary.
set -euo pipefail
case "$FP8PB_RDZV" in
  c10d) rdzv=(--rdzv_backend c10d --rdzv_endpoint "$FP8PB_RDZV_HOST:$FP8PB_PORT" --rdzv_id "$SLURM_JOB_ID") ;;
  static) rdzv=(--master_addr "$FP8PB_RDZV_HOST" --master_port "$FP8PB_PORT" --node_rank "$SLURM_NODEID") ;;
  *) echo "slurm_node: FP8PB_RDZV=$FP8PB_RDZV: choose c10d or static" >&2; exit 2 ;;
esac
exec "$FP8PB_PYTHON" launch/torchrun.py --nnodes "$SLURM_NNODES" --nproc_per_node "$FP8PB_NPROC_PER_NODE" \
  "${rdzv[@]}" --log-dir "$FP8PB_LOG_DIR/node-$SLURM_NODEID" --redirects 3 --tee 3 launch/export.py "$@"
