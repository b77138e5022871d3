#!/usr/bin/env bash
# One command for a lent GPU (at most 8 minutes on an H100-class card): the sampler (eager and
# compiled, SD2-base architecture) against the card's compute limit and the decode share, the CAS
# trainer (4000 images x 100 epochs, paper ResNet20), Ray Data generation against the raw sampler,
# one search trial, and the paper preset end to end on random:sd2-base with tiny budgets. Every
# table goes into benchmarks/RESULTS.md under the card's name (and into $OUT when set).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (installs .whl/ when present)
#   bash benchmarks/gpu_check.sh --cpu-tiny   # the same programs at tiny sizes on the CPU (a dry run)
#
# Prepare the wheels on a machine with the package index first: bash ../shared/tools/gpu-wheels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
out=${OUT:-$(mktemp -d)}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import ray, diffusers, optuna" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
py=python3
if [ "$mode" = "--cpu-tiny" ]; then
  fast="--cpu-tiny"; cas="--images 256 --epochs 2"; gen="--images 256 --batch 64 --steps 4"
  trial="--cpu-tiny --images 64 --epochs 2"; mini="--set sampling.batch_size=2"
else
  fast=""; cas="--images 4000 --epochs 100"; gen="--images 16384 --batch 512 --steps 20"
  trial="--images 4000"; mini="--set sampling.batch_size=64"
fi
start=$(date +%s)
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(( $(date +%s) - start ))s in)" >&2
  timeout "$limit" "$@" > "$out/$name.md" 2> "$out/$name.log" || echo "($name: failed or timed out after ${limit}s; see $name.log)" >> "$out/$name.md"
  tail -n 25 "$out/$name.md"
}
step fastpaths 200 $py benchmarks/bench_fastpaths.py $fast
step cas 90 $py benchmarks/bench_cas.py $cas
step generation 150 $py benchmarks/bench_generation.py $gen
step trial 90 $py benchmarks/bench_trial.py $trial
npz=$out/retina.npz
$py - "$npz" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(0)
arrays = {}
for split, n in (("train", 20), ("val", 10), ("test", 10)):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
    arrays[f"{split}_labels"] = (np.arange(n) % 5).reshape(-1, 1)
np.savez(sys.argv[1], **arrays)
PY
step paper_mini 150 $py -m raysd run --preset paper --base-model random:sd2-base --dataset "npz:$npz" \
  --out "$out/paper-run" --set encoder.epochs=1 --set encoder.steps_per_epoch=2 --set finetune.epochs=1 \
  --set finetune.steps_per_epoch=2 --set search.num_trials=2 --set search.num_images=10 \
  --set search.min_inference_steps=5 --set search.max_inference_steps=5 --set cas.max_epochs=2 \
  --set sampling.num_inference_steps=5 --set scale.scales=1 $mini
$py - "$out" "$mode" <<'PY'
import datetime, pathlib, platform, sys
import torch
out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only ({platform.machine()})"
parts = [f"## {datetime.date.today()}, {card}, torch {torch.__version__}: `bash benchmarks/gpu_check.sh {mode if mode != 'gpu' else ''}`".rstrip() + "\n"]
for name in ("fastpaths", "cas", "generation", "trial", "paper_mini"):
    text = (out / f"{name}.md").read_text().strip() if (out / f"{name}.md").exists() else "(not run)"
    if name == "paper_mini":
        text = "\n".join(line for line in text.splitlines() if line.startswith(("CAS top-1", "(paper_mini"))) or text
    parts.append(f"### {name}\n\n{text}\n")
results = pathlib.Path("benchmarks/RESULTS.md")
results.write_text(results.read_text().rstrip() + "\n\n" + "\n".join(parts))
print("\n".join(parts))
PY
echo "gpu_check: $(( $(date +%s) - start ))s; tables appended to benchmarks/RESULTS.md (and $out)"
