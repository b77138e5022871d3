"""`raysd run` end to end (the demo, reduced further), its resumption and invalidation, `ray job
submit` of jobs/run.py against a head started here, and the cluster files."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, s3_client, write_medmnist_npz
from raysd import pipeline
from raysd.config import load_config
from raysd.errors import RaysdError
from raysd.run.results import SCHEMA_KEYS

pytestmark = pytest.mark.ray

FAST = {  # the tiny base pretrained in the run (the pretrain stage), not the demo's shipped one
    "model.base_model": "tiny", "model.pretrain_steps": 20, "model.pretrain_batch_size": 16, "encoder.epochs": 1, "encoder.steps_per_epoch": 4,
    "encoder.global_batch_size": 16, "finetune.epochs": 2, "finetune.steps_per_epoch": 3,
    "finetune.global_batch_size": 16, "sampling.num_inference_steps": 3, "search.num_trials": 2,
    "search.num_images": 24, "search.min_inference_steps": 2, "search.max_inference_steps": 3, "cas.max_epochs": 2,
    "scale.scales": [1, 2], "scale.shard_size": 32, "resources.torch_threads": 1,
    "cas.both_protocols": True, "cas.strong_epochs": 2,  # Table 2 under the strong protocol too
    "model.base_cache": None,  # hermetic: no base kept in the user's cache between test sessions
}


def fast_cfg(root: Path, **extra):
    npz = write_medmnist_npz(root / "toy.npz", n=(48, 12, 12), classes=4, size=8)
    return load_config("demo", overrides={"run_dir": str(root / "run"), "dataset.name": f"npz:{npz}", **FAST, **extra})


def finished(run_dir) -> dict:
    m = json.loads((Path(run_dir) / "manifest.json").read_text())
    return {k: v.get("finished_at") for k, v in m["stages"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_session):
    """The reduced demo run once, undisturbed, on a local disk: (config, results)."""
    cfg = fast_cfg(tmp_path_factory.mktemp("reference"))
    return cfg, pipeline.run(cfg)


def test_demo_pipeline_results_report_and_invalidation(reference):
    cfg, res = reference
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
    # every CAS row has the metrics beside top-1, the test split's baselines, and the paired comparisons
    for row in [*res["scaling"].values(), *(s["cas"] for s in res["steps"].values())]:
        assert {"balanced_accuracy", "macro_f1", "auc", "interval"} <= set(row), row
        lo, hi = row["interval"]["top1"]
        assert lo <= row["top1"] <= hi
    counts = json.loads((run / "data" / "test" / "meta.json").read_text())["counts_per_class"]
    assert res["baselines"]["majority"]["top1"] == pytest.approx(max(counts) / sum(counts))
    assert {"x1 - real", "x2 - real", "after_3 - after_2"} <= set(res["comparisons"])
    assert len(res["per_class"]["x1"]["predictions"]) == sum(counts)
    md = (run / "report.md").read_text()
    assert "balanced acc. %" in md and "majority class" in md and "x2 against real: top1" in md
    other = res["other_protocol"]  # Table 2 under the strong protocol beside the paper's, with its comparisons
    assert res["protocol"] == "paper" and other["protocol"] == "strong" and set(other["scaling"]) == {"real", "x1", "x2"}
    assert other["scaling"]["x2"]["num_images"] == 96 and {"x1 - real", "x2 - real"} == set(other["comparisons"])
    assert all("interval" in row for row in other["scaling"].values())
    assert "Table 2 under the strong protocol" in md and "strong protocol: x2 against real" in md
    two = res["two_sample"]  # the label-free check of the smallest synthetic set against the real train split
    assert two["set"] == "x1" and 0 <= two["interval"][0] <= two["accuracy"] <= two["interval"][1] <= 1
    assert two["images_per_kind"] == 48 and "Real or synthetic: a ResNet20" in md
    audit = res["privacy"]  # the audit of x2 against the train split, beside the held-out test images
    assert audit["images"] == 96 and audit["held_out_images"] == 12 and audit["train_images"] == 48
    assert set(audit["membership"]) >= {"real", "x1"} and 0 <= audit["membership"]["real"]["auc"] <= 1
    assert audit["pixel"]["held_out_share_closer"] <= 0.1 and isinstance(audit["verdict"]["flagged"], bool)
    assert audit["duplicates"]["images"] == 48 and (run / audit["picture"]).stat().st_size > 0  # as many as real
    assert "Privacy audit" in md and "Membership inference" in md
    # `raysd audit` on the finished run: its recorded audit (skipped), the verdict as the exit status
    from raysd.cli import main

    audited = finished(run)["audit"]
    assert main(["audit", str(run)]) == int(audit["verdict"]["flagged"]) and finished(run)["audit"] == audited
    assert main(["audit", str(run), "--set", "cas.max_epochs=3"]) == 2  # only audit.* settings
    assert main(["audit", str(run.parent / "nothing-here")]) == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["provenance"]["versions"]["ray"] and manifest["provenance"]["config_hash"]
    from raysd.data.models import _load_models  # the after_k CAS ran on this driver: no generator kept after it

    assert _load_models.cache_info().currsize == 0

    # operational settings change how work runs, not what it made: every stage is skipped
    before = finished(run)
    pipeline.run(fast_cfg(run.parent, **{"sampling.batch_size": 100, "cas.eval_batch_size": 64,
                                         "search.max_concurrent_trials": 1}))
    assert finished(run) == before
    # a setting that changes what completed stages made: refused in one line, nothing written
    stamps = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}
    with pytest.raises(RaysdError, match=r"\(encoder.lr 0.01 -> 0.02\); rerunning would redo train_encoder \(\d+ s\), "
                                         r"after_1 .*report \(\d+ s\): pass --redo"):
        pipeline.run(fast_cfg(run.parent, **{"encoder.lr": 0.02}))
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")} == stamps
    # with --redo, a changed setting reruns only the stages that depend on it
    cfg3 = fast_cfg(run.parent, **{"scale.scales": [1, 2, 3]})
    res3 = pipeline.run(cfg3, redo=True)
    after = finished(run)
    rerun = {k for k in after if after[k] != before[k]}
    assert rerun == {"generate", "scaling", "audit", "report"}, rerun
    assert set(res3["scaling"]) == {"real", "x1", "x2", "x3"}
    # and an unchanged rerun does nothing
    pipeline.run(cfg3)
    assert finished(run) == after


def _raysd_run(cfg, *extra):
    sets = [f"--set={k}={v if not isinstance(v, list) else ','.join(map(str, v))}" for k, v in FAST.items()]
    return [sys.executable, "-m", "raysd", "run", "--preset", "demo", "--dataset", cfg.dataset.name, "--out",
            cfg.run_dir, *sets, *extra]


def _deterministic(res: dict) -> dict:
    """What must not depend on where a run was killed or where it lives (a search's trial order may)."""
    return {
        "keys": sorted(res), "dataset": res["dataset"].rsplit("/", 1)[-1],
        "pretrained_base": {k: v for k, v in (res.get("pretrained_base") or {}).items() if k != "base"},
        "after_1": res["steps"]["after_1"]["params"], "after_1_cas": res["steps"]["after_1"]["cas"],
        "num_images": {k: v["num_images"] for k, v in res["scaling"].items()},
        "real_cas": res["scaling"]["real"]["top1"],
    }


def _s3_status(env: dict, run: str) -> dict:
    client = s3_client(env)
    try:
        body = client.get_object(Bucket="raysd", Key=f"{run}/manifest.json")["Body"].read()
    except Exception:  # noqa: BLE001 - not written yet
        return {}
    return {k: v.get("status") for k, v in json.loads(body)["stages"].items()}


@pytest.mark.nightly  # 2-4 min: the whole reduced demo twice against the S3 server
def test_demo_on_s3_killed_mid_stage_then_resumed_and_verified(tmp_path, s3, private_ray_env, reference):
    """The whole reduced demo with --out s3://: killed in the middle of fine-tuning, rerun to the
    end with the same results as the undisturbed local run, then `raysd verify` on the bucket."""

    env, kill_cluster = private_ray_env
    env = {**env, **s3}
    cfg = fast_cfg(tmp_path)
    out = "s3://raysd/demo"
    cmd = _raysd_run(cfg, "--out", out)
    log = open(tmp_path / "first-run.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and _s3_status(env, "demo").get("finetune") != "running":
        time.sleep(0.5)
    time.sleep(3)  # inside the stage: some epochs written, not all
    before = _s3_status(env, "demo")
    kill_cluster(proc)
    log.close()
    assert before.get("finetune") == "running" and before.get("search_1") == "complete", (
        before, (tmp_path / "first-run.log").read_text()[-3000:])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("prepare", "pretrain", "train_encoder", "after_1", "search_1"):
        assert f"run: {stage} complete, skipped" in r.stderr
    client = s3_client(env)
    res = json.loads(client.get_object(Bucket="raysd", Key="demo/results.json")["Body"].read())
    assert _deterministic(res) == _deterministic(reference[1])
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="raysd", Prefix="demo/")["Contents"]]
    assert not any(".tmp-" in k for k in keys)  # nothing half-written left behind
    verify = [sys.executable, "-m", "raysd", "verify", out]
    v = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=300)
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]
    shard = sorted(k for k in keys if k.startswith("demo/synthetic/") and k.endswith(".parquet"))[0]
    data = bytearray(client.get_object(Bucket="raysd", Key=shard)["Body"].read())
    data[len(data) // 2] ^= 1
    client.put_object(Bucket="raysd", Key=shard, Body=bytes(data))
    v = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=300)
    assert v.returncode == 1 and f"DAMAGED s3://raysd/{shard}: damaged" in v.stdout, v.stdout[-2000:]


def test_ray_job_submit_of_jobs_run_py(tmp_path, private_ray_env):
    env, kill_cluster = private_ray_env
    cfg = fast_cfg(tmp_path)
    port, dash = free_port(), free_port()
    # the session's own cluster already holds Ray's default agent ports: give this head free ones
    agent_ports = [f"--{flag}={free_port()}" for flag in (
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


def test_jobs_entrypoints_and_runtime_env():
    assert yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["working_dir"] == "."
    for f in ("run", "prepare", "train_encoder", "finetune", "search", "generate", "cas", "report"):
        assert (REPO / "jobs" / f"{f}.py").exists()
