"""The report reads only what it shows: on a 200,000-image set (MedMNIST-sized images, 470 MB of
pixels) its driver grows by less than 300 MB over its baseline, because the sample grid reads a
shard per set, not the set."""

import json
import subprocess
import sys

import numpy as np

from conftest import REPO, write_medmnist_npz

N, SHARD = 200_000, 2_000

REPORT = r'''
import sys, psutil
from raysd.run.report import write_report
import matplotlib.pyplot

def hwm():  # the process's peak resident memory (VmHWM), in bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:  # start the peak afresh: the imports' transient memory is not the report's
    f.write("5")
base = psutil.Process().memory_info().rss
write_report(sys.argv[1])
print("GROWTH_MB", (hwm() - base) / 2**20)
'''


def test_the_report_of_a_200000_image_set_reads_a_shard_not_the_set(tmp_path):
    from raysd.config import load_config
    from raysd.data import imageset
    from raysd.run.rundir import Run
    from raysd.stages.prepare import ensure_prepared

    npz = write_medmnist_npz(tmp_path / "toy.npz", n=(40, 12, 12), classes=4, size=28)
    cfg = load_config("demo", overrides={"run_dir": str(tmp_path / "run"), "dataset.name": f"npz:{npz}"})
    run = Run(cfg)
    run.save_config()
    ensure_prepared(run)
    out = run.synthetic_dir("x5000")
    labels = np.arange(N) % 4
    files = {}
    for lo in range(0, N, SHARD):  # images that compress (a shade per class): 470 MB of pixels, little disk
        lab = labels[lo:lo + SHARD]
        images = np.broadcast_to((lab * 60).astype(np.uint8)[:, None, None, None], (len(lab), 28, 28, 3))
        name = f"shard-{lo // SHARD:06d}.parquet"
        files[name] = imageset.write_shard(out, name, np.arange(lo, lo + len(lab)), lab, images)
    imageset.write_meta(out, imageset.set_meta(dataset="toy", split="synthetic", class_names=list("abcd"),
                                               labels=labels, image_shape=(28, 28, 3), files=files, provenance={}))
    res = {"dataset": "toy", "preset": "demo", "base_model": "tiny", "seed": 0, "steps": {}, "scaling": {},
           "timings": {"generate": 1.0}, "generation": {"set": out, "num_images": N}}
    (tmp_path / "run" / "results.json").write_text(json.dumps(res))
    r = subprocess.run([sys.executable, "-c", REPORT, cfg.run_dir], capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    growth = float(r.stdout.split("GROWTH_MB ")[1].split()[0])
    assert (tmp_path / "run" / "figures" / "samples.png").stat().st_size > 1000
    print(f"\nthe report of {N} images: driver peak {growth:.0f} MB over its baseline")
    assert growth < 300, f"the report's driver grew by {growth:.0f} MB"
