"""`raysd run` end to end (the demo, reduced further), its resumption and invalidation, `ray job
submit` of jobs/run.py against a head started here, and the cluster files."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_medmnist_npz
from raysd import pipeline
from raysd.config import load_config
from raysd.run.results import SCHEMA_KEYS

pytestmark = pytest.mark.ray

FAST = {
    "model.pretrain_steps": 20, "model.pretrain_batch_size": 16, "encoder.epochs": 1, "encoder.steps_per_epoch": 4,
    "encoder.global_batch_size": 16, "finetune.epochs": 2, "finetune.steps_per_epoch": 3,
    "finetune.global_batch_size": 16, "sampling.num_inference_steps": 3, "search.num_trials": 2,
    "search.num_images": 24, "search.min_inference_steps": 2, "search.max_inference_steps": 3, "cas.max_epochs": 2,
    "scale.scales": [1, 2], "scale.shard_size": 32, "resources.torch_threads": 1,
}


def fast_cfg(root: Path, **extra):
    npz = write_medmnist_npz(root / "toy.npz", n=(48, 12, 12), classes=4, size=8)
    return load_config("demo", overrides={"run_dir": str(root / "run"), "dataset.name": f"npz:{npz}", **FAST, **extra})


def finished(run_dir) -> dict:
    m = json.loads((Path(run_dir) / "manifest.json").read_text())
    return {k: v.get("finished_at") for k, v in m["stages"].items()}


def test_demo_pipeline_results_report_and_invalidation(tmp_path, ray_session):
    cfg = fast_cfg(tmp_path)
    res = pipeline.run(cfg)
    run = Path(cfg.run_dir)
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == res and all(k in res for k in SCHEMA_KEYS)
    assert list(res["steps"]) == ["after_1", "after_2", "after_3", "after_4"]
    for step in res["steps"].values():
        assert set(step["params"]) == {"num_inference_steps", "guidance_scale", "epoch"}
        assert 0 <= step["cas"]["top1"] <= step["cas"]["top5"] <= 1 and step["num_images"] == 24
        assert step["generation_seconds"] > 0
    for s in ("search_1", "search_2"):
        assert set(res["importance"][s]) == {"num_inference_steps", "guidance_scale", "epoch"}
        assert sum(res["importance"][s].values()) == pytest.approx(1.0)
    assert set(res["scaling"]) == {"real", "x1", "x2"}
    assert res["scaling"]["x2"]["num_images"] == 2 * res["scaling"]["real"]["num_images"] == 96
    assert set(res["per_class"]) >= {"after_1", "after_4", "real", "x1", "x2"}
    assert len(res["per_class"]["x1"]["confusion"]) == 4 and res["timings"]["pretrain"] > 0
    assert res["pretrained_base"]["epochs"] >= 1
    for f in ("report.md", "report.html", "figures/scaling.png", "figures/importance.png", "figures/samples.png",
              "figures/confusion.png", "manifest.json"):
        assert (run / f).stat().st_size > 0, f
    html = (run / "report.html").read_text()
    assert "Table 2" in html and "data:image/png;base64," in html and "src=\"figures" not in html
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["provenance"]["versions"]["ray"] and manifest["provenance"]["config_hash"]

    # a changed setting reruns only the stages that depend on it
    before = finished(run)
    cfg3 = fast_cfg(tmp_path, **{"scale.scales": [1, 2, 3]})
    res3 = pipeline.run(cfg3)
    after = finished(run)
    rerun = {k for k in after if after[k] != before[k]}
    assert rerun == {"generate", "scaling", "report"}, rerun
    assert set(res3["scaling"]) == {"real", "x1", "x2", "x3"}
    # and an unchanged rerun does nothing
    pipeline.run(cfg3)
    assert finished(run) == after


def _raysd_run(cfg, *extra):
    sets = [f"--set={k}={v if not isinstance(v, list) else ','.join(map(str, v))}" for k, v in FAST.items()]
    return [sys.executable, "-m", "raysd", "run", "--preset", "demo", "--dataset", cfg.dataset.name, "--out",
            cfg.run_dir, *sets, *extra]


def test_kill_between_stages_then_resume_skips_completed_stages(tmp_path, private_ray_env):
    env, kill_cluster = private_ray_env
    cfg = fast_cfg(tmp_path)
    proc = subprocess.Popen(_raysd_run(cfg), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    manifest = Path(cfg.run_dir) / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["stages"].get("prepare", {}).get(
                "status") == "complete":
            break
        time.sleep(0.1)
    kill_cluster(proc)
    done = finished(cfg.run_dir)
    assert done.get("prepare") and "report" not in done
    r = subprocess.run(_raysd_run(cfg, "--resume", "--until", "pretrain"), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in [s for s, t in done.items() if t]:  # whatever completed before the kill is not redone
        assert f"run: {stage} complete, skipped" in r.stderr
        assert finished(cfg.run_dir)[stage] == done[stage]
    assert json.loads(manifest.read_text())["stages"]["pretrain"]["status"] == "complete"
    # a second run on the same directory while one holds it is refused
    lock = Path(cfg.run_dir) / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    r = subprocess.run(_raysd_run(cfg, "--until", "prepare"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "is in use by pid" in r.stderr
    lock.write_text(json.dumps({"pid": 999999999, "host": socket.gethostname()}))  # stale: recovered
    r = subprocess.run(_raysd_run(cfg, "--until", "prepare"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and not lock.exists(), r.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_of_jobs_run_py(tmp_path, private_ray_env):
    env, kill_cluster = private_ray_env
    cfg = fast_cfg(tmp_path)
    port, dash = _free_port(), _free_port()
    # the session's own cluster already holds Ray's default agent ports: give this head free ones
    agent_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port")]
    start = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                            *agent_ports],
                           env={**env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        sets = [f"--set={k}={v if not isinstance(v, list) else ','.join(map(str, v))}" for k, v in FAST.items()]
        runtime_env = json.dumps({"excludes": [".ci-venv/", ".git/", "runs/", "*.egg-info/"]})
        submit = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                  "--runtime-env-json", runtime_env, "--", "python", "jobs/run.py", "--preset", "demo",
                  "--dataset", cfg.dataset.name, "--out", cfg.run_dir, *sets, "--until", "pretrain"]
        deadline = time.time() + 60
        while True:  # the head's job agent registers a few seconds after `ray start` returns
            r = subprocess.run(submit, env={**env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=600)
            if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert "succeeded" in (r.stdout + r.stderr)
        stages = json.loads((Path(cfg.run_dir) / "manifest.json").read_text())["stages"]
        assert stages["pretrain"]["status"] == "complete"  # a Ray Train stage ran on the submitted-to cluster
    finally:
        kill_cluster()


def test_cluster_files_parse_and_carry_the_keys_ray_needs():
    for name in ("aws.yaml", "gcp.yaml"):
        c = yaml.safe_load((REPO / "cluster" / name).read_text())
        assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(c)
        assert c["head_node_type"] in c["available_node_types"]
        assert any(t["resources"].get("GPU") for t in c["available_node_types"].values())
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay-raycluster.yaml").read_text()))
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and "headGroupSpec" in rc["spec"]
    worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(v.get("persistentVolumeClaim") for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"])
    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "jobs/run.py" in job["spec"]["entrypoint"]
    assert "rayClusterSpec" in job["spec"]
    assert yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["working_dir"] == "."
    for f in ("run", "prepare", "train_encoder", "finetune", "search", "generate", "cas", "report"):
        assert (REPO / "jobs" / f"{f}.py").exists()
