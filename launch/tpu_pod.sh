#!/usr/bin/env bash
# Runs one exgra-jax process per TPU VM worker; jax discovers the pod (distributed.mode=auto).
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra --config.* flags]
# The repo and its .venv must exist at ~/exgra-jax on every worker; WORKDIR must be a path
# every worker mounts (Filestore NFS, or a bucket mounted with gcsfuse at the same path), so
# that every host writes the same checkpoints. gs:// URLs are refused (README, step 7).
#
# Settings per slice, from the TPU compiler's plans of the 7B pmc10 steps
# (tools/plan_memory.py --topology=...; the table and every figure are in docs/train.md).
# pmc10's global batches: stage 1 128, stage 2 64. G16 below means
#   --config.align.grouping=fixed --config.align.group_size=16   (groups spanning chips).
#   v5p-8   (v5p:2x2x1, 4 chips):  --config.mesh.fsdp=4. Stage 2: 16 x 512 per chip with
#       per-chip groups (53.1 GiB of 95); 2048 tokens: --config.stage2.micro_batches=4 + G16
#       (4 x 2048 per chip, 50.4 GiB). Stage 1: --config.stage1.micro_batches=2 (15.2 GiB).
#   v5p-64  (v5p:4x4x2, 32 chips): --config.mesh.fsdp=32 + G16 (2 per chip; 14.7 GiB at 16).
#   v5p-128 (v5p:4x4x4, 64 chips): --config.mesh.fsdp=64 + G16 (1 per chip; 12.6 GiB at 16).
#   v6e-8   (v6e:2x4, 8 chips, 32 GB): --config.mesh.fsdp=8; stage 2 8 x 512 per chip with
#       per-chip groups (27.6 GiB); 2048 tokens: --config.stage2.micro_batches=4 + G16
#       (26.2 GiB); stage 1: --config.stage1.micro_batches=2.
#   v5e-16  (v5e:4x4, 16 chips, 16 GB): --config.mesh.fsdp=16 + G16
#       --config.stage2.micro_batches=4 (1 x 512 per chip: 14.1 GiB; 1 x 2048: 14.5 GiB).
# Check a new slice or setting before booking it: plan_memory.py refuses settings that
# cannot work and prints the compiler's peak per chip.
set -euo pipefail
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all --command="
  cd ~/exgra-jax && source .venv/bin/activate &&
  python -m exgra_jax.main --mode=train --config=${config} --workdir=${workdir} \
    --config.distributed.mode=auto $*"
