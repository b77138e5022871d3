"""Ray Data generation against the raw sampler: images/s and their ratio, same run, same device.

    python benchmarks/bench_generation.py                 # GPU: SD2-base architecture (random weights), 50,000 images
    python benchmarks/bench_generation.py --images 512     # CPU: the tiny model

Raw: the core sampler in this process, batches of ``--batch``. Ray Data: ``raysd.generation``
end to end (plan -> actor pool -> Parquet shards -> meta.json), actor start included.
DESIGN.md section 5 (one H100, 4096 images): raw 136 img/s, Ray Data 81 img/s. Target >= 90 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    import ray

    from raysd.config import load_config
    from raysd.core.models import ClassEncoder
    from raysd.data import checkpoints as ck
    from raysd.data.models import load_generator
    from raysd.run.generators import resolve_spec
    from raysd.run.rundir import Run
    from raysd.stages.generate import generate_set
    from raysd.stages.prepare import ensure_prepared

    cuda = torch.cuda.is_available()
    n = args.images or (50_000 if cuda else 512)
    batch = args.batch or (512 if cuda else 128)
    root = Path(tempfile.mkdtemp(prefix="raysd-bench-"))
    over = {"run_dir": str(root / "run"), "dataset.name": "digits", "model.pretrain_steps": 0,
            "sampling.batch_size": batch, "sampling.num_inference_steps": args.steps, "scale.shard_size": 4 * batch}
    if cuda:
        over.update({"model.base_model": "random:sd2-base", "model.resolution": 128, "model.seq_len": 77,
                     "model.precision": "fp16", "resources.device": "cuda"})
    else:
        over.update({"resources.torch_threads": torch.get_num_threads(), "resources.generation_actors": 1})
    ray.init(include_dashboard=False, log_to_driver=False)
    cfg = load_config("demo", overrides=over)
    run = Run(cfg)
    run.save_config()
    ensure_prepared(run)
    dim = 1024 if cuda else 32
    enc = ClassEncoder(10, cfg.model.seq_len, dim, cfg.model.hidden_dim)
    ck.write_checkpoint(ck.epoch_dir(run.ckpt_root("encoder"), 1), model_state=enc.state_dict(), meta={
        "kind": "encoder", "epoch": 1, "loss": 0.0, "class_encoder": {
            "num_classes": 10, "seq_len": cfg.model.seq_len, "dim": dim, "hidden_dim": cfg.model.hidden_dim,
            "null_class": False}})
    spec = resolve_spec(run, guidance_scale=2.0)
    plan = run.plan(n, "uniform")
    generator = load_generator(spec, "cuda" if cuda else "cpu")
    n_raw = min(n, 8 * batch)
    generator.images(plan.labels[:batch], plan.seeds[:batch], batch_size=batch)  # warm-up
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generator.images(plan.labels[:n_raw], plan.seeds[:n_raw], batch_size=batch)
    if cuda:
        torch.cuda.synchronize()
    raw = n_raw / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    generate_set(cfg, str(root / "run" / "synthetic" / "bench"), num_images=n, class_balance="uniform", spec=spec)
    ray_rate = n / (time.perf_counter() - t0)
    print(table(f"generation, {spec.base} at {spec.resolution} px, {args.steps} DDIM steps, UGS 2",
                ["path", "images", "img/s", "ratio to raw"],
                [["raw sampler (this process)", n_raw, raw, 1.0], ["Ray Data pipeline (actor start included)", n,
                                                                   ray_rate, ray_rate / raw]]))


if __name__ == "__main__":
    main()
