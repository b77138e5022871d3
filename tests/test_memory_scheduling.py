"""Workers ask Ray for the memory they need: on a node declaring room for two trials' estimated
memory and four CPUs, a search runs at most two trials at once (the demo preset's settings
unchanged); on a (fake) accelerator whose stated memory holds two trials, two trials share it,
half a GPU each. Each runs in a subprocess with a cluster of its own."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, make_tiny_run

pytestmark = pytest.mark.ray

SCRIPT = r'''
import json, logging, sys, threading, time
logging.basicConfig(level=logging.INFO)
import ray
from ray.cluster_utils import Cluster
from raysd.config import flatten, load_config
from raysd.run import sizing
from raysd.run.rundir import Run
from raysd.stages.search import search

GB = 2**30
saved = json.load(open(sys.argv[1] + "/config.json"))
over = {k: v for k, v in flatten(saved).items() if k != "preset"}
plain = load_config(saved["preset"], overrides=over)
host = sizing.trial(plain, Run(plain), 1, "cpu").host
gpu_over = {**over, "resources.accelerator": "fake_gpu", "resources.device": "cuda"}
card = sizing.trial(load_config(saved["preset"], overrides=gpu_over), Run(plain), 1, "cuda").gpu
gpu_over["resources.gpu_memory_gb"] = 2.5 * card / GB / 0.9  # holds two trials' share, not three
# four CPUs; memory for 2.5 trials by the estimate; one (fake) accelerator
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "memory": int(2.5 * host),
                                                        "resources": {"fake_gpu": 1}})
ray.init(address=cluster.address)
peak = {"cpus": 0.0}
def poll():  # the most CPUs the trials held at once (one each)
    while True:
        peak["cpus"] = max(peak["cpus"], 4 - ray.available_resources().get("CPU", 4))
        time.sleep(0.05)
threading.Thread(target=poll, daemon=True).start()
out = {}
for mode, settings, restart in (("memory", over, False), ("gpu", gpu_over, True)):
    peak["cpus"] = 0.0
    search(load_config(saved["preset"], overrides=settings), 1, restart=restart)
    out[mode] = peak["cpus"]
print("PEAK", json.dumps(out))
ray.shutdown()
cluster.shutdown()
'''


def test_trials_at_once_are_what_memory_holds(tmp_path, ray_session, private_ray_env):
    env, _ = private_ray_env
    cfg = make_tiny_run(tmp_path, encoder_epochs=2, **{"cas.max_epochs": 3, "search.num_images": 24,
                                                       "search.num_trials": 4, "search.max_inference_steps": 3,
                                                       "search.min_inference_steps": 2})
    r = subprocess.run([sys.executable, "-c", SCRIPT, cfg.run_dir], env=env, capture_output=True, text=True,
                       timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    peak = json.loads(r.stdout.split("PEAK ", 1)[1].splitlines()[0])
    said = [line for line in r.stderr.splitlines() if "at once" in line and "needs about" in line]
    assert len(said) == 2 and all("2 at once" in line for line in said), said
    assert "GB of host memory" in said[0] and "0.5 GPU each" in said[1], said
    assert peak["memory"] <= 2 and peak["gpu"] <= 2, peak  # four CPUs: memory (or the card) held two
