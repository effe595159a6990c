#!/usr/bin/env bash
# N processes of one run over loopback (CPU, gloo collectives): the multi-host path on one
# machine. Usage: launch/local_multiprocess.sh N PORT -- python -m exgra_jax.main --config=... --workdir=...
# Each process gets --config.distributed.{mode,coordinator_address,num_processes,process_id};
# the script waits for all and exits with the first non-zero status.
set -euo pipefail
num=$1; port=$2; shift 2
[[ "${1:-}" == "--" ]] && shift
pids=()
for ((i = 0; i < num; i++)); do
  "$@" --config.distributed.mode=explicit --config.distributed.coordinator_address="127.0.0.1:${port}" \
    --config.distributed.num_processes="${num}" --config.distributed.process_id="${i}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || { rc=$?; [[ ${status} -eq 0 ]] && status=${rc}; }
done
exit "${status}"
