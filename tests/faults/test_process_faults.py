"""Processes killed at chosen points on real local Ray clusters (subprocesses with a cluster of
their own): a generation actor mid-batch, a node of a simulated three-node cluster mid-generation,
a Ray Train worker mid-run, a Tune trial mid-trial. Each time the work completes, and what it
produces equals an undisturbed run's."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_tiny_run, write_medmnist_npz
from raysd.data import checkpoints as ck
from raysd.data import imageset as sets
from raysd.run.rundir import Run
from raysd.stages.generate import generate_set
from raysd.run.generators import resolve_spec

pytestmark = pytest.mark.ray

N = 60  # 6 shards of 10


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, ray_session):
    cfg = make_tiny_run(tmp_path_factory.mktemp("faults"), **{"sampling.num_inference_steps": 8})
    ref = Run(cfg).synthetic_dir("ref")
    generate_set(cfg, ref, num_images=N, class_balance="real", spec=resolve_spec(Run(cfg), guidance_scale=2.0))
    return cfg, sets.read_set(ref)


def fault_env(env, tmp_path, point):
    return {**env, "RAYSD_FAULT": point, "RAYSD_FAULT_MARKER": str(tmp_path / f"fired-{point}"),
            "RAYSD_FAULT_MODE": "exit"}


def assert_same_set(out, ref):
    got = sets.read_set(str(out))
    assert got.sample_ids.tolist() == list(range(N))  # every sample_id exactly once
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_array_equal(got.images, ref.images)  # identical images


def test_generation_actor_killed_mid_batch(gen_run, private_ray_env, tmp_path):
    cfg, ref = gen_run
    env, _ = private_ray_env
    fenv = fault_env(env, tmp_path, "generate_shard")
    cmd = [sys.executable, "-m", "raysd", "generate", "--run", cfg.run_dir, "--num-images", str(N),
           "--guidance-scale", "2.0", "--name", "killed-actor"]
    r = subprocess.run(cmd, env=fenv, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "fired-generate_shard").exists()  # the actor process really died (os._exit)
    if r.returncode != 0:  # Ray Data may give up on the batch; a rerun then completes the set
        r = subprocess.run(cmd, env=fenv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_set(Run(cfg).synthetic_dir("killed-actor"), ref)


NODE_LOSS = r'''
import json, logging, os, sys, threading, time
logging.basicConfig(level=logging.INFO)
import ray
from ray.cluster_utils import Cluster
from raysd.config import flatten, load_config
from raysd.stages.generate import generate_set
from raysd.run.generators import resolve_spec
from raysd.run.rundir import Run
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
ray.init(address=cluster.address)
saved = json.load(open(sys.argv[1] + "/config.json"))
over = {k: v for k, v in flatten(saved).items() if k != "preset"}
over.update({"resources.generation_actors": 3, "resources.shared_storage": True})
cfg = load_config(saved["preset"], overrides=over)
out, n = sys.argv[2], int(sys.argv[3])
state = {}
def remove_a_node():
    while not any(f.startswith("shard-") for f in (os.listdir(out) if os.path.isdir(out) else [])):
        time.sleep(0.01)
    state["complete_at_removal"] = os.path.exists(os.path.join(out, "meta.json"))
    cluster.remove_node(workers[0])
    state["removed"] = True
threading.Thread(target=remove_a_node, daemon=True).start()
spec = resolve_spec(Run(cfg), guidance_scale=2.0)
try:
    generate_set(cfg, out, num_images=n, class_balance="real", spec=spec)
    state["first_try"] = "completed"
except Exception as e:
    state["first_try"] = type(e).__name__
    generate_set(cfg, out, num_images=n, class_balance="real", spec=spec)
state["nodes_left"] = sum(1 for x in ray.nodes() if x["Alive"])
print("STATE", json.dumps(state))
ray.shutdown()
cluster.shutdown()
'''


def test_node_removed_mid_generation(gen_run, private_ray_env):
    cfg, ref = gen_run
    env, _ = private_ray_env
    out = Run(cfg).synthetic_dir("node-loss")
    r = subprocess.run([sys.executable, "-c", NODE_LOSS, cfg.run_dir, out, str(N)], env=env, capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads(r.stdout.split("STATE ", 1)[1].splitlines()[0])
    assert state["removed"] and not state["complete_at_removal"] and state["nodes_left"] == 2, state
    assert_same_set(out, ref)


# --------------------------------------------------------------------------------------------
# A Ray Train worker killed: FailureConfig restarts the group, which resumes from its checkpoint


def _train_cli(run_dir, npz):
    over = {"dataset.name": f"npz:{npz}", "model.base_model": "tiny", "model.pretrain_steps": 0,
            "model.resolution": 16, "encoder.epochs": 3, "encoder.steps_per_epoch": 30, "encoder.global_batch_size": 8,
            "resources.num_workers": 1, "resources.torch_threads": 1, "resources.max_failures": 2}
    return [sys.executable, "-m", "raysd", "train-encoder", "--preset", "demo", "--run", str(run_dir),
            *[f"--set={k}={v}" for k, v in over.items()]]


def _weights(run_dir, epoch=3):
    return ck.load_weights(str(Path(run_dir) / "checkpoints" / "encoder" / f"epoch_{epoch:03d}"))[0]


@pytest.mark.nightly  # 3-5 min: three training runs, two of them killed
def test_train_worker_or_driver_killed_then_training_matches_an_undisturbed_run(tmp_path, private_ray_env):
    env, kill_cluster = private_ray_env
    npz = write_medmnist_npz(tmp_path / "toy.npz", n=(48, 12, 12), classes=3, size=8)
    a = subprocess.run(_train_cli(tmp_path / "a", npz), env=env, capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]

    # 1. the worker process dies after training epoch 2, before reporting it: FailureConfig
    #    restarts the worker group, which resumes from epoch 1's checkpoint, in the same command
    b = subprocess.run(_train_cli(tmp_path / "b", npz), env=fault_env(env, tmp_path, "train_epoch_2"),
                       capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-3000:]
    assert (tmp_path / "fired-train_epoch_2").exists()
    assert "resuming encoder after epoch 1" in b.stdout + b.stderr

    # 2. the driver and its whole cluster killed mid-epoch 2; the same command run again resumes
    proc = subprocess.Popen(_train_cli(tmp_path / "c", npz), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    first = tmp_path / "c" / "checkpoints" / "encoder" / "epoch_001" / ck.CKPT_JSON
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert first.exists(), "the first checkpoint never appeared"
    kill_cluster(proc)
    assert not (tmp_path / "c" / "checkpoints" / "encoder" / "epoch_003" / ck.CKPT_JSON).exists()
    c = subprocess.run(_train_cli(tmp_path / "c", npz), env=env, capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr[-3000:]
    assert "resuming encoder after epoch" in c.stdout + c.stderr

    wa = _weights(tmp_path / "a")
    for run in ("b", "c"):
        assert ck.valid_epochs(str(tmp_path / run / "checkpoints" / "encoder")) == [1, 2, 3]
        wx = _weights(tmp_path / run)
        for k in wa:  # the same final weights as the undisturbed run, same LR schedule and data order
            np.testing.assert_allclose(wa[k].numpy(), wx[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=(run, k))


def test_a_worker_killed_with_a_staged_checkpoint_leaves_nothing_behind(tmp_path, private_ray_env):
    """Fine-tuning's worker dies after staging epoch 1's checkpoint in its local temp root, before
    Ray took it: the restarted worker removes what the dead one left, and the run completes."""
    env, _ = private_ray_env
    staging = tmp_path / "staging"
    staging.mkdir()
    cfg = make_tiny_run(tmp_path, encoder_epochs=1, **{"finetune.epochs": 2, "finetune.steps_per_epoch": 2,
                                                        "finetune.global_batch_size": 8, "resources.max_failures": 2,
                                                        "resources.cpu_finetune_workers": 1, "model.null_class": False})
    cmd = [sys.executable, "-m", "raysd", "finetune", "--run", cfg.run_dir, "--encoder-epoch", "1"]
    r = subprocess.run(cmd, env={**fault_env(env, tmp_path, "checkpoint_staged_1"), "RAYSD_TMPDIR": str(staging)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "fired-checkpoint_staged_1").exists()  # the worker really died holding a staged copy
    assert ck.valid_epochs(Run(cfg).ckpt_root("unet")) == [1, 2]
    assert not list(staging.glob("raysd-*")), list(staging.iterdir())


# --------------------------------------------------------------------------------------------
# A Tune trial process killed: the trial retries from its checkpoint; the search keeps its plan


def test_tune_trial_killed_retries_and_the_search_ends_with_the_planned_trials(tmp_path, private_ray_env):
    env, _ = private_ray_env
    cfg = make_tiny_run(tmp_path, encoder_epochs=2, **{
        "cas.max_epochs": 3, "cas.batch_size": 16, "cas.variant": "standard", "search.num_images": 24,
        "search.num_trials": 3, "search.scheduler": "asha", "search.min_inference_steps": 1,
        "search.max_inference_steps": 3, "search.max_guidance_scale": 4.0, "search.max_concurrent_trials": 1,
        "resources.cpus_per_trial": 1.0, "resources.max_failures": 2})
    cmd = [sys.executable, "-m", "raysd", "search", "--run", cfg.run_dir, "--phase", "1"]
    r = subprocess.run(cmd, env=fault_env(env, tmp_path, "trial_epoch_2"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "fired-trial_epoch_2").exists()
    with open(Path(Run(cfg).search_dir(1)) / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and len({row["trial_id"] for row in rows}) == 3
    assert json.loads((Path(Run(cfg).search_dir(1)) / "best.json").read_text())["num_trials"] == 3
