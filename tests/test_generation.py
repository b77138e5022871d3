"""Ray Data generation: plan, shards, determinism, resume after faults, several nodes, CAS, export."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_tiny_run
from raysd.data import imageset as sets
from raysd.run.rundir import Run
from raysd.errors import RaysdError
from raysd.run.export import class_folder, export_set
from raysd.stages.generate import generate_set
from raysd.run.generators import resolve_spec
from raysd.data.models import load_generator

pytestmark = pytest.mark.ray

N = 37  # 4 shards of 10: the last one short


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_session):
    return make_tiny_run(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def reference(tiny_run):
    """The undisturbed set every other run must reproduce exactly."""
    spec = resolve_spec(Run(tiny_run), guidance_scale=2.0)
    out = Run(tiny_run).synthetic_dir("ref")
    meta = generate_set(tiny_run, out, num_images=N, class_balance="real", spec=spec)
    return out, meta


def test_set_has_every_sample_once_and_matches_the_core_sampler(tiny_run, reference):
    out, meta = reference
    s = sets.read_set(out)
    assert s.sample_ids.tolist() == list(range(N)) and meta["num_rows"] == N
    assert sorted(meta["files"]) == [f"shard-{i:06d}.parquet" for i in range(4)]
    plan = Run(tiny_run).plan(N, "real")
    assert s.labels.tolist() == plan.labels.tolist() and meta["counts_per_class"] == plan.counts
    gen = meta["provenance"]["generator"]
    assert gen["guidance_scale"] == 2.0 and gen["encoder_sha256"] and gen["unet_sha256"] is None
    spec = resolve_spec(Run(tiny_run), guidance_scale=2.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors ran
    try:
        direct = load_generator(spec, "cpu").images(plan.labels[10:20], plan.seeds[10:20], batch_size=8)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(s.images[10:20], direct)


def test_rerun_is_a_no_op_and_other_settings_are_refused(tiny_run, reference):
    out, meta = reference
    stamp = {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    again = generate_set(tiny_run, out, num_images=N, class_balance="real", spec=resolve_spec(Run(tiny_run), guidance_scale=2.0))
    assert again == meta and {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()} == stamp
    with pytest.raises(RaysdError, match="made with other settings"):
        generate_set(tiny_run, out, num_images=N, class_balance="real", spec=resolve_spec(Run(tiny_run), guidance_scale=3.0))


def test_missing_shards_are_made_again_identically(tiny_run, reference):
    ref_dir, ref_meta = reference
    out = Run(tiny_run).synthetic_dir("partial")
    spec = resolve_spec(Run(tiny_run), guidance_scale=2.0)
    generate_set(tiny_run, out, num_images=N, class_balance="real", spec=spec)
    (Path(out) / "meta.json").unlink()  # as if killed before the end ...
    (Path(out) / "shard-000002.parquet").unlink()  # ... with one shard not yet written
    meta = generate_set(tiny_run, out, num_images=N, class_balance="real", spec=spec)
    assert meta["files"] == ref_meta["files"]  # same bytes, shard by shard


def test_bad_generation_requests(tiny_run):
    with pytest.raises(RaysdError, match="encoder epoch 9 has no valid checkpoint"):
        resolve_spec(Run(tiny_run), encoder_epoch=9)
    with pytest.raises(RaysdError, match="must be >= 1"):
        generate_set(tiny_run, Run(tiny_run).synthetic_dir("zero"), num_images=0, class_balance="real",
                     spec=resolve_spec(Run(tiny_run)))


def _generate_cli(run_dir, name, *extra):
    return [sys.executable, "-m", "raysd", "generate", "--run", str(run_dir), "--num-images", str(N),
            "--guidance-scale", "2.0", "--name", name, *extra]


def test_driver_kill_then_rerun(tiny_run, reference, private_ray_env, tmp_path):
    """The driver (and its cluster) killed after the first shard, then a rerun (a generation
    actor killed mid-batch: tests/faults)."""
    env, kill_cluster = private_ray_env
    ref = sets.read_set(reference[0])
    proc = subprocess.Popen(_generate_cli(tiny_run.run_dir, "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    out = Path(Run(tiny_run).synthetic_dir("killed"))
    deadline = time.time() + 240
    while not list(out.glob("shard-*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_cluster(proc)
    assert not (out / "meta.json").exists()
    r = subprocess.run(_generate_cli(tiny_run.run_dir, "killed"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = sets.read_set(str(out))
    assert got.sample_ids.tolist() == list(range(N))
    np.testing.assert_array_equal(got.images, ref.images)


MULTI_NODE = r'''
import json, logging, sys
logging.basicConfig(level=logging.INFO)
import ray, ray.data
from ray.cluster_utils import Cluster
from raysd.config import load_config
from raysd.stages.generate import generate_set
from raysd.run.generators import resolve_spec
from raysd.run.rundir import Run
# Each node offers one "slot" and every generation actor asks for one (a custom accelerator), so
# the pool's three actors are one per node whatever Ray's placement would prefer; the pool waits
# for its three actors before the first shard, and an actor takes one shard at a time: the first
# three shards go to three nodes, however fast each actor starts.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"slot": 1}})
for _ in range(2):
    cluster.add_node(num_cpus=1, resources={"slot": 1})
ray.init(address=cluster.address)
ray.data.DataContext.get_current().wait_for_min_actors_s = 300
saved = json.load(open(sys.argv[1] + "/config.json"))
from raysd.config import flatten
over = {k: v for k, v in flatten(saved).items() if k != "preset"}
over.update({"resources.generation_actors": 3, "resources.shared_storage": True, "resources.accelerator": "slot",
             "resources.device": "cpu"})
cfg = load_config(saved["preset"], overrides=over)
meta = generate_set(cfg, sys.argv[2], num_images=int(sys.argv[3]), class_balance="real",
                    spec=resolve_spec(Run(cfg), guidance_scale=2.0))
print("NODES", len(ray.nodes()))
ray.shutdown()
cluster.shutdown()
'''


def test_three_simulated_nodes_give_identical_output(tiny_run, reference, private_ray_env):
    env, _ = private_ray_env
    out = Run(tiny_run).synthetic_dir("multinode")
    r = subprocess.run([sys.executable, "-c", MULTI_NODE, tiny_run.run_dir, out, str(N)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NODES 3" in r.stdout
    used = json.loads(r.stderr.split("shards per node ")[1].splitlines()[0])
    assert sum(used.values()) == 4 and len(used) == 3, used  # the work really spread over the three nodes
    assert sets.read_meta(out)["files"] == reference[1]["files"]  # byte-identical shards


def test_local_run_dir_refused_on_several_nodes_without_shared_storage(tiny_run, private_ray_env):
    env, _ = private_ray_env
    code = MULTI_NODE.replace('"resources.shared_storage": True', '"resources.shared_storage": False')
    r = subprocess.run([sys.executable, "-c", code, tiny_run.run_dir, "/tmp/never", str(N)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode != 0 and "is a local path but the Ray cluster has 3 nodes" in r.stderr


def test_cas_cli_on_real_digits_writes_json(tmp_path, ray_session):
    from raysd.stages.prepare import prepare_dataset

    prepare_dataset("digits", str(tmp_path / "digits"))
    out = tmp_path / "cas.json"
    r = subprocess.run([sys.executable, "-m", "raysd", "cas", "--train", str(tmp_path / "digits" / "train"),
                        "--dataset", "digits", "--variant", "standard", "--set", "cas.max_epochs=6",
                        "--set", "cas.batch_size=128", "--set", "cas.image_size=16", "--set", "cas.seeds=2",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["num_images"] == 1078 and res["epochs_run"] == 6 and res["top1"] > 0.5
    assert len(res["confusion"]) == 10 and res["variant"] == "standard"
    # two classifier seeds: the first the run's, top1 their mean, each kept, their sd beside it
    seeds = res["seeds"]
    assert [s["seed"] for s in seeds][0] == 0 and len({s["seed"] for s in seeds}) == 2
    assert res["top1"] == pytest.approx(np.mean([s["top1"] for s in seeds]))
    assert res["sd"]["top1"] == pytest.approx(np.std([s["top1"] for s in seeds], ddof=1))
    assert 0 <= res["balanced_accuracy"] <= 1 and res["auc"] > 0.5 and len(res["predictions"]) == 359  # the test split
    assert r.stderr.count("seed 2 of 2") == 1


def test_cas_cli_refuses_an_incomplete_set(tmp_path):
    (tmp_path / "half").mkdir()
    r = subprocess.run([sys.executable, "-m", "raysd", "cas", "--train", str(tmp_path / "half"), "--dataset", "digits"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "incomplete: meta.json is missing" in r.stderr and "Traceback" not in r.stderr


def test_exports_round_trip(reference, tmp_path):
    from PIL import Image
    import pyarrow.parquet as pq
    from torchvision.datasets import ImageFolder

    src = sets.read_set(reference[0])
    export_set(reference[0], "imagefolder", str(tmp_path / "if"))
    folder = ImageFolder(str(tmp_path / "if"))
    assert folder.classes == [class_folder(i, n) for i, n in enumerate(src.class_names)]
    got = sorted((int(Path(p).stem), y) for p, y in folder.samples)
    assert got == list(zip(src.sample_ids.tolist(), src.labels.tolist()))
    np.testing.assert_array_equal(np.asarray(Image.open(folder.samples[0][0])), src.images[int(Path(folder.samples[0][0]).stem)])

    export_set(reference[0], "npz", str(tmp_path / "npz"))
    z = np.load(tmp_path / "npz" / "data.npz")
    np.testing.assert_array_equal(z["train_images"], src.images)
    np.testing.assert_array_equal(z["train_labels"].ravel(), src.labels)

    export_set(reference[0], "hf", str(tmp_path / "hf"))
    table = pq.read_table(next((tmp_path / "hf" / "data").glob("*.parquet")))
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["label"]["names"] == src.class_names
    row = table.slice(5, 1).to_pylist()[0]
    import io

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))), src.images[5])
    assert row["label"] == src.labels[5]
    with pytest.raises(RaysdError, match="already exists"):
        export_set(reference[0], "npz", str(tmp_path / "npz"))


def test_a_shard_cut_short_is_made_again_not_recorded(tiny_run, reference):
    """A file:// run directory, killed while writing: a shard file no record lists (cut short) and a
    recorded one that no longer matches its checksum are both made again; the set equals the
    undisturbed one, and the recorded shards were checked in the generation tasks."""
    import json as _json

    ref_dir, ref_meta = reference
    out = "file://" + Run(tiny_run).synthetic_dir("cut-short")
    local = Path(Run(tiny_run).synthetic_dir("cut-short"))
    spec = resolve_spec(Run(tiny_run), guidance_scale=2.0)
    generate_set(tiny_run, out, num_images=N, class_balance="real", spec=spec)
    assert not (local / "shards.json").exists()  # meta.json lists them once the set is complete
    (local / "meta.json").unlink()  # as if killed before the end, with:
    record = {str(i): info["sha256"] for i, (name, info) in enumerate(sorted(ref_meta["files"].items()))}
    del record["2"]  # shard 2 cut short mid-write: its file is there, no record lists it
    (local / "shards.json").write_text(_json.dumps(record))
    data = (local / "shard-000002.parquet").read_bytes()
    (local / "shard-000002.parquet").write_bytes(data[: len(data) // 2])
    data = bytearray((local / "shard-000001.parquet").read_bytes())  # and a recorded one damaged since
    data[len(data) // 2] ^= 1
    (local / "shard-000001.parquet").write_bytes(bytes(data))
    meta = generate_set(tiny_run, out, num_images=N, class_balance="real", spec=spec)
    assert meta["files"] == ref_meta["files"]  # the same bytes as the undisturbed set, shard by shard
    np.testing.assert_array_equal(sets.read_set(out).images, sets.read_set(ref_dir).images)
