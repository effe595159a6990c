#!/usr/bin/env bash
# Runs one exgra-jax process per TPU VM worker; jax discovers the pod (distributed.mode=auto).
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra --config.* flags]
# The repo and its .venv must exist at ~/exgra-jax on every worker; WORKDIR must be shared
# storage (e.g. gs://bucket/run1) so that every host writes the same checkpoints.
#
# Settings per slice, from the TPU compiler's plans of the 7B pmc10 stage-2 step with the
# alignment (tools/plan_memory.py --topology=...; table and figures in docs/train.md):
#   v5p:4x4x4 (64 chips): --config.mesh.fsdp=64; up to 16 x 512 tokens per chip (12.6 GiB
#       of 95). The release's global batch of 64 is 1 sample per chip, too few for a graph:
#       add --config.align.grouping=fixed --config.align.group_size=16 (groups over 16 chips).
#   v5p:2x2x1 (4 chips): --config.mesh.fsdp=4; 16 x 512 per chip (53 GiB of 95): the
#       release's global batch of 64 with per-chip groups of 16 (the default grouping).
#   v5e:4x4 (16 chips, 16 GB): --config.mesh.fsdp=16, 1 x 512 per chip (14.1 GiB):
#       --config.stage2.global_batch=64 --config.stage2.micro_batches=4
#       --config.align.grouping=fixed --config.align.group_size=16.
# Check a new slice or setting before booking it: plan_memory.py refuses settings that
# cannot work and prints the compiler's peak per chip.
set -euo pipefail
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all --command="
  cd ~/exgra-jax && source .venv/bin/activate &&
  python -m exgra_jax.main --mode=train --config=${config} --workdir=${workdir} \
    --config.distributed.mode=auto $*"
