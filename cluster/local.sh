#!/usr/bin/env bash
# One machine, one GPU: start a local Ray head that owns the GPU, then submit raysd jobs to it.
#
#   bash cluster/local.sh            # starts the head (stop it with: ray stop)
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/run.py --preset paper --dataset retinamnist --data-dir ~/.medmnist --out runs/retina
#
# `raysd run ...` started in a shell on this machine also finds this head by itself (ray.init()
# connects to a running local cluster); without a head, raysd starts a private one in-process.
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0
num_gpus=${NUM_GPUS:-1}
ray start --head --num-gpus="$num_gpus" --dashboard-host=127.0.0.1 --dashboard-port=8265 "$@"
echo
echo "Ray head running with $num_gpus GPU(s). Submit with:"
echo "  ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/run.py --help"
echo "Stop with: ray stop"
