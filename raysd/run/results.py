"""``results.json`` of a run, in the schema of DESIGN.md section 4, from the manifest's outputs.

``steps`` is the paper's Table 1 (the CAS of a ``search.num_images`` set after each step),
``importance`` its Fig. 1 (fANOVA importances of both searches), ``scaling`` its Table 2 (real
data and x1..xK), plus ``timings``, ``per_class`` (per-class accuracy and confusion matrix of
every CAS) and the provenance of the run.
"""

from __future__ import annotations

from typing import Any

from raysd.config import Config
from raysd.core.metrics import baselines, paired_difference
from raysd.data import storage
from raysd.run.scores import PARAM_KEYS, Score

# The paper's Table 2 (ResNet20 top-1 %, real test set): real, x1 and the best synthetic scale.
PAPER_TABLE2 = {
    "cifar10": {"real": 83.26, "x1": 79.09, "best": 85.82, "best_scale": 7},
    "cifar100": {"real": 60.55, "x1": 45.19, "best": 52.93, "best_scale": 10},
    "pathmnist": {"real": 88.70, "x1": 85.19, "best": 86.45, "best_scale": 10},
    "dermamnist": {"real": 75.71, "x1": 66.98, "best": 69.42, "best_scale": 7},
    "bloodmnist": {"real": 96.22, "x1": 85.56, "best": 86.58, "best_scale": 5},
    "retinamnist": {"real": 47.75, "x1": 40.50, "best": 52.00, "best_scale": 4},
}


def _search_score(out: dict[str, Any]) -> Score:
    """Table 1's after_2 / after_4: the best trial's classifier on the test split."""
    b = out["best"]
    return Score(top1=b["test_top1"], top5=b["test_top5"], num_images=b["num_images"],
                 params={k: b[k] for k in PARAM_KEYS}, generation_seconds=b.get("generation_seconds"),
                 metrics=b.get("metrics") or {}, **out["per_class"])


def table1(st: dict[str, Any]) -> dict[str, Score]:
    """{after_k: Score} for the completed steps, in order."""
    rows = {name: Score.from_step_json(st[name]) for name in ("after_1", "after_3") if name in st}
    rows.update({name: _search_score(st[search]) for name, search in (("after_2", "search_1"), ("after_4", "search_2"))
                 if search in st})
    return {k: rows[k] for k in ("after_1", "after_2", "after_3", "after_4") if k in rows}


TWO_SAMPLE = "two_sample"  # the scaling stage's two-sample test, beside its rows in the manifest's outputs
OTHER_PROTOCOL = "other_protocol"  # Table 2 under the other classifier protocol (cas.both_protocols), beside them too
NOT_ROWS = (TWO_SAMPLE, OTHER_PROTOCOL)

# the differences the report may call a gain: each scale against real data, each step against the one before
STEP_PAIRS = (("after_2", "after_1"), ("after_3", "after_2"), ("after_4", "after_3"))


def comparisons(cfg: Config, steps: dict[str, Score], scaling: dict[str, Score]) -> dict[str, Any]:
    """Paired-bootstrap differences (top-1 and balanced accuracy, 95 %) of rows scored on the same
    test images: ``"x2 - real"``, ``"after_3 - after_2"``, ... (rows without predictions, from older
    runs, are left out)."""
    rows = {**steps, **scaling}
    pairs = [(k, "real") for k in scaling if k != "real"] + list(STEP_PAIRS)
    pairs = [(a, b) for a, b in pairs if a in rows and b in rows and rows[a].predictions and rows[b].predictions]
    if not pairs:
        return {}
    from raysd.run.rundir import Run

    y = Run(cfg).read_split("test").labels
    return {f"{a} - {b}": {m: paired_difference(y, rows[a].predictions, rows[b].predictions, m, seed=cfg.seed)
                           for m in ("top1", "balanced_accuracy")}
            for a, b in pairs if len(rows[a].predictions) == len(rows[b].predictions) == len(y)}


def _baselines(st: dict[str, Any]) -> dict[str, Any] | None:
    """The test split's majority-class and chance rows (from its class counts)."""
    test = st.get("prepare", {}).get("test")
    return baselines(test["counts_per_class"]) if test and test.get("counts_per_class") else None


def _other_protocol(cfg: Config, found: dict[str, Any] | None) -> dict[str, Any] | None:
    """Table 2 under the other protocol: its rows, paired comparisons (x_k - real) and per-class tables."""
    if not found:
        return None
    rows = {name: Score.from_scale_json(r) for name, r in found["rows"].items()}
    return {"protocol": found["protocol"], "scaling": {k: s.table2_row() for k, s in rows.items()},
            "comparisons": comparisons(cfg, {}, rows), "per_class": {k: s.per_class for k, s in rows.items()}}


def build_results(cfg: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """Assemble and write RUN/results.json from the completed stages' outputs."""
    st = {k: v.get("outputs", {}) for k, v in manifest["stages"].items() if v.get("status") == "complete"}
    steps = table1(st)
    scaling = {name: Score.from_scale_json(r) for name, r in st.get("scaling", {}).items() if name not in NOT_ROWS}
    timings = {k: round(v.get("seconds", 0.0), 2) for k, v in manifest["stages"].items() if v.get("status") == "complete"}
    gen = st.get("generate", {})
    results = {
        "dataset": cfg.dataset.name, "preset": cfg.preset, "base_model": cfg.model.base_model, "seed": cfg.seed,
        "steps": {k: s.table1_row() for k, s in steps.items()},
        "importance": {s: st[s]["importance"] for s in ("search_1", "search_2") if s in st},
        "importance_full_budget": {s: st[s]["importance_basis"]["full_budget"]["importances"]
                                   for s in ("search_1", "search_2") if "full_budget" in st.get(s, {}).get(
                                       "importance_basis", {})},
        "scaling": {k: s.table2_row() for k, s in scaling.items()},
        "baselines": _baselines(st),
        "comparisons": comparisons(cfg, steps, scaling),
        "two_sample": st.get("scaling", {}).get(TWO_SAMPLE),
        "privacy": st.get("audit"),
        "protocol": cfg.cas.protocol,
        "other_protocol": _other_protocol(cfg, st.get("scaling", {}).get(OTHER_PROTOCOL)),
        "timings": timings,
        "per_class": {k: s.per_class for k, s in {**steps, **scaling}.items()},
        "class_names": st.get("prepare", {}).get("class_names"),
        "generation": {k: gen.get(k) for k in ("set", "num_images", "images_per_second", "params", "seconds")}
        if gen else {},
        "pretrained_base": st.get("pretrain"),
        "numerics": NUMERICS[cfg.model.precision],
        "search_objective": cfg.search.objective,
        "paper": PAPER_TABLE2.get(cfg.dataset.name),
        "provenance": manifest.get("provenance", {}),
    }
    storage.write_json(storage.join(cfg.run_dir, "results.json"), results)
    return results


NUMERICS = {  # what model.precision means for training, generation and the CAS classifiers (core/precision.py)
    "auto": "bf16 on CUDA (generation, CAS, training); on a CPU with native bf16 (AVX512-BF16/AMX) bf16 generation "
            "and CAS, fp32 training; fp32 on other CPUs; the released code ran fp32 (precision: fp32 reproduces it)",
    "fp32": "fp32 everywhere, as the released code",
    "bf16": "bf16 on CUDA; on a CPU with native bf16 bf16 generation and CAS, fp32 training; fp32 on other CPUs",
    "fp16": "fp16 autocast on CUDA (fp32 on the CPU)",
}

SCHEMA_KEYS = ("dataset", "preset", "base_model", "seed", "steps", "importance", "scaling", "timings")
