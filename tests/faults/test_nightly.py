"""The nightly set: long schedules skipped in CI (run with `RAYSD_NIGHTLY=1 pytest -m nightly`).

1. The `raysd run` driver (and the cluster it started) killed with SIGKILL at 12 points chosen
   by a seeded schedule across every stage; each rerun continues, the last completes, and
   `results.json` equals an undisturbed run's in everything that is deterministic.
2. Load: 200,000 tiny images generated on a local cluster whose object store is capped at
   200 MB, completing by backpressure and spilling, with the driver's peak memory flat in N.
"""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_pipeline import _raysd_run, fast_cfg

pytestmark = [pytest.mark.ray, pytest.mark.nightly]

STAGES = ["prepare", "pretrain", "train_encoder", "after_1", "search_1", "finetune", "after_3", "search_2",
          "generate", "scaling"]


def _stage_status(run_dir: Path) -> dict:
    m = run_dir / "manifest.json"
    try:
        return {k: v.get("status") for k, v in json.loads(m.read_text())["stages"].items()}
    except (FileNotFoundError, ValueError):
        return {}


def _deterministic(res: dict) -> dict:
    """What must not depend on where the runs were killed (the searches' trial order may)."""
    return {
        "keys": sorted(res), "dataset": Path(res["dataset"]).name,  # the two runs live in different folders
        "pretrained_base": {k: v for k, v in (res.get("pretrained_base") or {}).items() if k != "base"},
        "after_1": res["steps"]["after_1"]["params"], "after_1_cas": res["steps"]["after_1"]["cas"],
        "num_images": {k: v["num_images"] for k, v in res["scaling"].items()},
        "real_cas": res["scaling"]["real"]["top1"],
    }


def test_driver_killed_at_twelve_seeded_points_then_completes(tmp_path, private_ray_env):
    env, kill_cluster = private_ray_env
    for d in ("ref", "killed"):
        (tmp_path / d).mkdir()
    ref_cfg = fast_cfg(tmp_path / "ref")
    r = subprocess.run(_raysd_run(ref_cfg), env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = json.loads((Path(ref_cfg.run_dir) / "results.json").read_text())

    cfg = fast_cfg(tmp_path / "killed")
    run_dir = Path(cfg.run_dir)
    rng = random.Random(20261125)
    # two kill points in each of the first stages, then one per stage: 12 in all, each at a
    # seeded delay after its stage is seen running
    schedule = [(s, rng.uniform(0.0, 4.0)) for s in STAGES[:2] for _ in range(2)] + \
               [(s, rng.uniform(0.0, 4.0)) for s in STAGES[2:]]
    killed_in = []
    for stage, delay in schedule:
        if _stage_status(run_dir).get(stage) == "complete":
            continue
        proc = subprocess.Popen(_raysd_run(cfg), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and _stage_status(run_dir).get(stage) is None:
            time.sleep(0.05)
        time.sleep(delay)
        if proc.poll() is None:
            killed_in.append((stage, round(delay, 2), dict(_stage_status(run_dir))))
        kill_cluster(proc)
    assert len(killed_in) >= 10, killed_in
    r = subprocess.run(_raysd_run(cfg), env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((run_dir / "results.json").read_text())
    assert _deterministic(got) == _deterministic(reference), killed_in
    verify = subprocess.run([sys.executable, "-m", "raysd", "verify", str(run_dir)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout[-3000:]
    print("killed in:", killed_in)


LOAD = r'''
import json, logging, resource, sys, time
logging.basicConfig(level=logging.INFO)
import ray
ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False)
from raysd.config import flatten, load_config
from raysd.stages.generate import generate_set
from raysd.run.generators import resolve_spec
from raysd.data import imageset as sets
saved = json.load(open(sys.argv[1] + "/config.json"))
over = {k: v for k, v in flatten(saved).items() if k != "preset"}
over.update({"scale.shard_size": 5000, "sampling.batch_size": 1024, "resources.generation_actors": 2})
cfg = load_config(saved["preset"], overrides=over)
spec = resolve_spec(Run(cfg), num_inference_steps=1, guidance_scale=1.0)
out = {}
for n in (20_000, 200_000):
    t0 = time.time()
    meta = generate_set(cfg, sys.argv[2] + f"/n{n}", num_images=n, class_balance="uniform", spec=spec)
    out[n] = {"rows": meta["num_rows"], "seconds": time.time() - t0,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print("LOAD", json.dumps(out))
'''


def test_two_hundred_thousand_images_under_a_200mb_object_store(tmp_path, private_ray_env):
    from conftest import make_tiny_run
    from raysd.data import imageset as sets

    env, _ = private_ray_env
    cfg = make_tiny_run(tmp_path, **{"model.resolution": 8})
    r = subprocess.run([sys.executable, "-c", LOAD, cfg.run_dir, str(tmp_path / "sets")], env=env,
                       capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    load = json.loads(r.stdout.split("LOAD ", 1)[1].splitlines()[0])
    small, big = load["20000"], load["200000"]
    assert small["rows"] == 20_000 and big["rows"] == 200_000
    assert big["peak_rss_mb"] < 1.5 * small["peak_rss_mb"], load  # flat in N: nothing accumulates on the driver
    meta = sets.read_meta(str(tmp_path / "sets" / "n200000"))
    assert sum(meta["counts_per_class"]) == 200_000 and len(meta["files"]) == 40
    print("load:", load)
