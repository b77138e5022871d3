"""Several nodes: Ray Train with workers on two simulated nodes (the same losses as one worker), a
Tune search whose trials run on both, and a cluster that starts with no accelerator workers and
grows under Ray's fake multi-node autoscaler until the x10 generation completes on the nodes it
added. Each runs in a subprocess with a cluster of its own."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, free_port, make_tiny_run, write_medmnist_npz

pytestmark = pytest.mark.ray

TRAIN = r'''
import json, sys
import ray
from ray.cluster_utils import Cluster
from raysd.config import load_config
from raysd.data import checkpoints as ck
from raysd.run.rundir import Run
from raysd.stages.train import train
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
out = {}
for name, workers in (("one", 1), ("two", 2)):
    cfg = load_config("demo", overrides={
        "run_dir": f"{sys.argv[1]}/{name}", "dataset.name": f"npz:{sys.argv[2]}", "model.base_model": "tiny",
        "model.pretrain_steps": 0, "model.resolution": 16, "encoder.epochs": 2, "encoder.steps_per_epoch": 3,
        "encoder.global_batch_size": 8, "resources.num_workers": workers, "resources.torch_threads": 1,
        "resources.shared_storage": True})
    train(cfg, "encoder")
    root = Run(cfg).ckpt_root("encoder")
    out[name] = [ck.read_meta(ck.epoch_dir(root, e))["loss"] for e in (1, 2)]
out["nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
print("LOSSES", json.dumps(out))
ray.shutdown()
cluster.shutdown()
'''


def test_train_on_two_nodes_gives_the_losses_of_one_worker(tmp_path, private_ray_env):
    env, _ = private_ray_env
    npz = write_medmnist_npz(tmp_path / "toy.npz", n=(48, 12, 12), classes=3, size=8)
    r = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path), str(npz)], env=env, capture_output=True,
                       text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("LOSSES ", 1)[1].splitlines()[0])
    assert got["nodes"] == 2  # 1 CPU each: the two workers cannot share a node
    assert got["two"] == pytest.approx(got["one"], rel=1e-4), got  # the same noise per sample, the same mean gradient


TUNE = r'''
import csv, json, sys
import ray
from ray.cluster_utils import Cluster
from raysd.config import flatten, load_config
from raysd.run.rundir import Run
from raysd.stages.search import search
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
saved = json.load(open(sys.argv[1] + "/config.json"))
over = {k: v for k, v in flatten(saved).items() if k != "preset"}
over.update({"resources.shared_storage": True, "search.max_concurrent_trials": 2})
cfg = load_config(saved["preset"], overrides=over)
search(cfg, 1)
rows = list(csv.DictReader(open(Run(cfg).search_dir(1) + "/trials.csv")))
print("TRIALS", json.dumps({"n": len(rows), "nodes": sorted({r["node"] for r in rows})}))
ray.shutdown()
cluster.shutdown()
'''


def test_tune_trials_run_on_both_nodes(tmp_path, ray_session, private_ray_env):
    env, _ = private_ray_env
    cfg = make_tiny_run(tmp_path, encoder_epochs=2, **{
        "cas.max_epochs": 2, "cas.batch_size": 16, "cas.variant": "standard", "search.num_images": 16,
        "search.num_trials": 4, "search.scheduler": "asha", "search.min_inference_steps": 1,
        "search.max_inference_steps": 2, "resources.cpus_per_trial": 1.0})
    r = subprocess.run([sys.executable, "-c", TUNE, cfg.run_dir], env=env, capture_output=True, text=True,
                       timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("TRIALS ", 1)[1].splitlines()[0])
    assert got["n"] == 4 and len(got["nodes"]) == 2, got


AUTOSCALE = r'''
import json, logging, sys, time
logging.basicConfig(level=logging.INFO)
import ray
from raysd.config import flatten, load_config
from raysd.run.generators import resolve_spec
from raysd.run.rundir import Run
from raysd.stages.generate import generate_set
ray.init(address=sys.argv[3])
head = ray.get_runtime_context().get_node_id()
start_nodes = sum(1 for n in ray.nodes() if n["Alive"])
saved = json.load(open(sys.argv[1] + "/config.json"))
over = {k: v for k, v in flatten(saved).items() if k != "preset"}
over.update({"resources.accelerator": "fake_gpu", "resources.max_gpus": 2, "resources.shared_storage": True,
             "resources.generation_actors": None})
cfg = load_config(saved["preset"], overrides=over)
meta = generate_set(cfg, sys.argv[2], num_images=60, class_balance="real", spec=resolve_spec(Run(cfg), guidance_scale=2.0))
print("STATE", json.dumps({"head": head, "start_nodes": start_nodes, "rows": meta["num_rows"],
                           "nodes": sum(1 for n in ray.nodes() if n["Alive"])}))
'''


def test_an_autoscaled_cluster_grows_accelerator_nodes_and_generates_on_them(tmp_path, ray_session, private_ray_env):
    """Ray's fake multi-node provider: the head has no accelerator; the generation pool's actors
    each ask for one (a custom resource standing in for a GPU), the autoscaler adds nodes that have
    it, and every shard is made on them, none on the head."""
    env, kill_cluster = private_ray_env
    cfg = make_tiny_run(tmp_path, **{"sampling.num_inference_steps": 2, "scale.shard_size": 15})
    from ray.util import get_node_ip_address

    port = free_port()
    # Ray's fake multi-node provider, configured as its example.yaml does (that file is not in every
    # Ray wheel): the head has one CPU and no accelerator; workers appear with one "fake_gpu" each.
    example = {
        "cluster_name": "raysd-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"{get_node_ip_address()}:{port}"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "accelerator_node": {"resources": {"CPU": 1, "fake_gpu": 1}, "node_config": {}, "min_workers": 0,
                                 "max_workers": 2}},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}}
    (tmp_path / "autoscaler.yaml").write_text(json.dumps(example))
    agent_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "dashboard-port")]
    head_env = {**env, "RAY_ADDRESS": "", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    start = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=1",
                            f"--autoscaling-config={tmp_path / 'autoscaler.yaml'}", "--disable-usage-stats",
                            *agent_ports], env=head_env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        out = str(tmp_path / "x")
        try:
            r = subprocess.run([sys.executable, "-c", AUTOSCALE, cfg.run_dir, out, f"127.0.0.1:{port}"],
                               env={**env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=420, cwd=REPO)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"no nodes came: {str(e.stderr or '')[-3000:]}")
        assert r.returncode == 0, r.stderr[-3000:]
        state = json.loads(r.stdout.split("STATE ", 1)[1].splitlines()[0])
        used = json.loads(r.stderr.split("shards per node ")[1].splitlines()[0])
        assert state["start_nodes"] == 1 and state["nodes"] >= 2 and state["rows"] == 60, state
        assert state["head"] not in used and sum(used.values()) == 4, (state, used)  # never on the head
    finally:
        kill_cluster()
