#!/usr/bin/env bash
# Runs one exgra-jax process per TPU VM worker; jax discovers the pod (distributed.mode=auto).
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra --config.* flags]
# The repo and its .venv must exist at ~/exgra-jax on every worker; WORKDIR must be shared
# storage (e.g. gs://bucket/run1) so that every host writes the same checkpoints.
set -euo pipefail
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all --command="
  cd ~/exgra-jax && source .venv/bin/activate &&
  python -m exgra_jax.main --mode=train --config=${config} --workdir=${workdir} \
    --config.distributed.mode=auto $*"
