"""``report.md`` and a self-contained ``report.html`` (PNG figures embedded) from results.json.

Tables: the paper's Table 1 (CAS after each step) and Table 2 (real data vs x1..xK, with the
paper's numbers beside ours for its six datasets); figures: fANOVA importances of both
searches, CAS against scale with the real-data line, generated samples per class next to real
ones, per-class accuracy and a confusion matrix for every CAS, stage timings.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from raysd.config import Config, config_from_dict
from raysd.data import imageset, storage
from raysd.errors import RaysdError
from raysd.run.rundir import Run
from raysd.run.privacy_report import privacy_lines, privacy_table
from raysd.run.tables import grid, pct

PARAM_NAMES = {"num_inference_steps": "IS", "guidance_scale": "UGS", "epoch": "epoch"}


def _cfg(run_dir: str) -> Config:
    path = storage.join(run_dir, "config.json")
    if not storage.exists(path):
        raise RaysdError(f"report: {run_dir} is not a raysd run (no config.json)")
    return config_from_dict(storage.read_json(path))


def _png(fig) -> bytes:  # noqa: ANN001
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Figures


def fig_importance(res: dict[str, Any]):
    import matplotlib.pyplot as plt

    imp, full = res.get("importance", {}), res.get("importance_full_budget", {})
    if not imp:
        return None
    fig, axes = plt.subplots(1, len(imp), figsize=(4.2 * len(imp), 2.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], imp.items()):
        keys = list(values)
        y = np.arange(len(keys))
        ax.barh(y + 0.2, [values[k] for k in keys], height=0.4, color="#4C72B0", label="all trials (paper's Fig. 1)")
        if name in full:
            ax.barh(y - 0.2, [full[name][k] for k in keys], height=0.4, color="#DD8452", label="full-budget trials")
        ax.set_yticks(y, [PARAM_NAMES.get(k, k) for k in keys])
        ax.set_xlim(0, 1)
        ax.legend(fontsize=6, loc="lower right")
        ax.set_title(f"{name.replace('_', ' ')}: fANOVA importance", fontsize=9)
    fig.tight_layout()
    return fig


def fig_scaling(res: dict[str, Any]):
    import matplotlib.pyplot as plt

    sc = res.get("scaling", {})
    ks = sorted(int(k[1:]) for k in sc if k.startswith("x"))
    if not ks:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(ks, [100 * sc[f"x{k}"]["top1"] for k in ks], "o-", label="synthetic (ours)")
    if "real" in sc:
        ax.axhline(100 * sc["real"]["top1"], color="k", ls="--", label="real data (ours)")
    paper = res.get("paper")
    if paper:
        ax.axhline(paper["real"], color="gray", ls=":", label="real data (paper)")
        ax.plot([1, paper["best_scale"]], [paper["x1"], paper["best"]], "s", color="gray", label="paper x1 / best")
    ax.set_xlabel("scale (x real training-set size)")
    ax.set_ylabel("CAS top-1 (%)")
    ax.set_xticks(ks)
    ax.legend(fontsize=7)
    ax.set_title(f"{res['dataset']}: CAS against scale", fontsize=9)
    fig.tight_layout()
    return fig


def fig_samples(cfg: Config, res: dict[str, Any], per_class: int = 6, max_classes: int = 20):
    """Real and generated images side by side, a row per class: only the shards that hold them are
    read (a report of a 900,000-image set loads a shard or two, not the set)."""
    import matplotlib.pyplot as plt

    gen_dir = (res.get("generation") or {}).get("set") or _largest_synthetic(cfg)
    if gen_dir is None or not imageset.is_complete(gen_dir):
        return None
    run = Run(cfg)
    n_cls = min(run.num_classes, max_classes)
    rows_r = imageset.first_per_class(run.split_dir("train"), per_class, n_cls)
    rows_g = imageset.first_per_class(gen_dir, per_class, n_cls)
    class_names = run.train_meta["class_names"]
    fig, axes = plt.subplots(n_cls, 2, figsize=(2 * per_class * 0.55 + 1.5, 0.6 * n_cls + 0.6), squeeze=False)
    h, w = run.image_size
    for c in range(n_cls):
        for j, rows in enumerate((rows_r, rows_g)):
            strip = np.zeros((h, w * per_class, 3), np.uint8)
            for i, im in enumerate(rows[c]):
                strip[:, i * w : (i + 1) * w] = im
            ax = axes[c, j]
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(class_names[c][:14], rotation=0, ha="right", va="center", fontsize=7)
            if c == 0:
                ax.set_title(["real", "generated"][j], fontsize=9)
    fig.tight_layout()
    return fig


def _largest_synthetic(cfg: Config) -> str | None:
    root = storage.join(cfg.run_dir, "synthetic")
    names = [n for n in storage.listdir(root) if n.startswith("x") and n[1:].isdigit()]
    return storage.join(root, max(names, key=lambda n: int(n[1:]))) if names else None


def _cas_names(res: dict[str, Any]) -> list[str]:
    return [n for n in ("after_1", "after_2", "after_3", "after_4") if n in res.get("per_class", {})] + [
        n for n in ["real"] + sorted((k for k in res.get("scaling", {}) if k.startswith("x")), key=lambda k: int(k[1:]))
        if n in res.get("per_class", {})]


def fig_confusions(res: dict[str, Any]):
    import matplotlib.pyplot as plt

    names = _cas_names(res)
    if not names:
        return None
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        m = np.asarray(res["per_class"][name]["confusion"], float)
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.axis("on")
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
        ax.tick_params(labelsize=5)
    fig.tight_layout()
    return fig


def fig_timings(res: dict[str, Any]):
    import matplotlib.pyplot as plt

    t = res.get("timings", {})
    if not t:
        return None
    fig, ax = plt.subplots(figsize=(5, 0.3 * len(t) + 0.8))
    ax.barh(list(t), list(t.values()), color="#55A868")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("stage wall time (last run of each stage)", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Text


def table1(res: dict[str, Any]) -> tuple[str, str]:
    labels = {"after_1": "1: Class-Encoder, default IS/UGS", "after_2": "2: + search 1",
              "after_3": "3: + UNet fine-tuning", "after_4": "4: + search 2"}
    rows = []
    for k, v in res.get("steps", {}).items():
        p = v["params"]
        rows.append([labels[k], str(p["num_inference_steps"]), f"{p['guidance_scale']:.2f}", str(p["epoch"]),
                     pct(v["cas"]["top1"]), _ci(v["cas"], "top1"), pct(v["cas"].get("balanced_accuracy")),
                     pct(v["cas"]["top5"]), str(v["num_images"])])
    return grid(["after step", "IS", "UGS", "epoch", "CAS top-1 %", "95 % interval", "balanced acc. %", "top-5 %",
                "images"], rows)


def _ci(row: dict[str, Any], metric: str) -> str:
    """The row's 95 % bootstrap interval over the test split, in points."""
    iv = (row.get("interval") or {}).get(metric)
    return "–" if not iv else f"{100 * iv[0]:.1f}–{100 * iv[1]:.1f}"


def _metric_cells(row: dict[str, Any]) -> list[str]:
    auc = row.get("auc")
    sd = (row.get("sd") or {}).get("top1")
    top1 = pct(row["top1"]) + (f" ± {100 * sd:.2f} ({len(row['seeds'])} seeds)" if sd is not None else "")
    return [top1, _ci(row, "top1"), pct(row.get("balanced_accuracy")), _ci(row, "balanced_accuracy"),
            pct(row.get("macro_f1")), "–" if auc is None else f"{auc:.3f}", pct(row["top5"])]


def table2(res: dict[str, Any], sc: dict[str, Any] | None = None) -> tuple[str, str]:
    """Table 2 (``sc``: its rows under another protocol; the paper's column is for the paper protocol's)."""
    paper = (res.get("paper") or {}) if sc is None and res.get("protocol", "paper") == "paper" else {}
    sc = res.get("scaling", {}) if sc is None else sc
    rows = []
    for k in ["real"] + sorted((k for k in sc if k.startswith("x")), key=lambda k: int(k[1:])):
        if k not in sc:
            continue
        p = paper.get(k) if k in ("real", "x1") else (paper.get("best") if paper and k == f"x{paper.get('best_scale')}"
                                                      else None)
        rows.append([k, str(sc[k]["num_images"]), *_metric_cells(sc[k]), f"{p:.2f}" if p is not None else "–"])
    for name, row in (res.get("baselines") or {}).items():  # what predicting without learning scores
        label = f"majority class ({row['class']})" if name == "majority" else "chance (uniform guess)"
        rows.append([label, "–", *_metric_cells(row), "–"])
    return grid(["training set", "images", "CAS top-1 %", "95 % interval", "balanced acc. %", "95 % interval",
                "macro-F1 %", "AUC", "top-5 %", "paper top-1 %"], rows)


def two_sample_lines(res: dict[str, Any]) -> list[str]:
    """The label-free check: how well a classifier told the synthetic images from real ones."""
    t = res.get("two_sample")
    if not t:
        return []
    lo, hi = (100 * x for x in t["interval"])
    verdict = ("it could not tell them apart" if lo <= 50 else
               "they are trivially told apart" if lo >= 95 else "they are told apart, not trivially")
    return [f"Real or synthetic: a ResNet20 trained to tell the real train images from {t['set']}'s scored "
            f"{100 * t['accuracy']:.1f} % ({lo:.1f} to {hi:.1f}) on {t['test_images']} held-out images, AUC "
            f"{t['auc']:.3f} (50 %: indistinguishable; 100 %: trivially told apart): {verdict}."]


def comparison_lines(res: dict[str, Any], prefix: str = "") -> list[str]:
    """One sentence per paired comparison: a difference is called a gain or a loss only when its
    95 % paired-bootstrap interval excludes 0."""
    lines = []
    for pair, by_metric in (res.get("comparisons") or {}).items():
        a, b = pair.split(" - ")
        parts = []
        for metric, d in by_metric.items():
            lo, hi = (100 * x for x in d["interval"])
            better = "better" if d["difference"] > 0 else "worse"
            verdict = f"{a} {better} beyond the test split's noise" if d["clear"] else "inside the noise: no claim"
            parts.append(f"{metric.replace('_', ' ')} {100 * d['difference']:+.1f} points ({lo:+.1f} to {hi:+.1f}; "
                         f"{verdict})")
        lines.append(f"{prefix}{a} against {b}: " + "; ".join(parts) + ".")
    return lines


PROTOCOLS = {"paper": "the paper's protocol (its released code: Adam, no augmentation, early stopping on val)",
             "strong": "the strong protocol (He et al.'s ResNet20, crop and flip, SGD with Nesterov momentum, "
                       "one-cycle schedule)"}


def per_class_table(res: dict[str, Any]) -> tuple[str, str]:
    names = _cas_names(res)
    classes = res.get("class_names") or []
    rows = [[c[:30]] + [pct(res["per_class"][n]["per_class_accuracy"][i]) for n in names]
            for i, c in enumerate(classes)]
    return grid(["class"] + names, rows)


def write_report(run_dir: str) -> dict[str, Any]:
    """Write RUN/report.md, RUN/report.html and RUN/figures/*.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    path = storage.join(run_dir, "results.json")
    if not storage.exists(path):
        raise RaysdError(f"report: {run_dir} has no results.json yet; run `raysd run` to completion first")
    res = storage.read_json(path)
    cfg = _cfg(run_dir)
    figs = {"importance": fig_importance(res), "scaling": fig_scaling(res), "samples": fig_samples(cfg, res),
            "confusion": fig_confusions(res), "timings": fig_timings(res)}
    pngs = {k: _png(f) for k, f in figs.items() if f is not None}
    for k, data in pngs.items():
        storage.write_bytes(storage.join(run_dir, "figures", f"{k}.png"), data)
    picture = (res.get("privacy") or {}).get("picture")
    if picture and storage.exists(storage.join(run_dir, picture)):  # the audit's closest pairs
        pngs["audit"] = storage.read_bytes(storage.join(run_dir, picture))
    for phase in (1, 2):  # Optuna's optimization history of each search, when drawn
        p = storage.join(Run(cfg).search_dir(phase), "optimization_history.png")
        if storage.exists(p):
            pngs[f"search_{phase}_history"] = storage.read_bytes(p)
    md, body = _text(res, pngs)
    storage.write_bytes(storage.join(run_dir, "report.md"), md.encode())
    storage.write_bytes(storage.join(run_dir, "report.html"), body.encode())
    return {"report_md": storage.join(run_dir, "report.md"), "report_html": storage.join(run_dir, "report.html"),
            "figures": sorted(pngs)}


def _notes(res: dict[str, Any]) -> list[str]:
    """The report's opening bullet points: what was run, on what, and how to read it."""
    gen = res.get("generation") or {}
    base = res.get("pretrained_base")
    notes = [f"Base model: `{res['base_model']}`; seed {res['seed']}."]
    if base:
        kept = (f"; copied from {base['cached_from']}, where an earlier run on the same data and settings kept it"
                if base.get("cached_from") else "")
        notes.append(f"No pretrained weights were used: the tiny base was pretrained on this train split for "
                     f"{base.get('steps')} steps without class labels (a caption-like PCA context standing in for SD's "
                     f"pretraining; final loss {base['loss']:.4f}){kept}.")
    if gen:
        notes.append(f"Generation: {gen.get('num_images')} images at {gen.get('images_per_second', 0):.1f} images/s "
                     f"with {gen.get('params')}.")
    if res.get("numerics"):
        notes.append(f"Numerics: {res['numerics']}.")
    if res.get("search_objective") == "test":
        notes.append("Search objective: the test accuracy of each trial's best-val weights (the paper's protocol; "
                     "it lets the test split choose the parameters).")
    protocol = res.get("protocol", "paper")
    other = (res.get("other_protocol") or {}).get("protocol")
    notes.append(f"CAS: ResNet20 trained on the named set only under {PROTOCOLS[protocol]}"
                 + (f" (Table 2 also under {PROTOCOLS[other]})" if other else "") + ", its best weights on the real "
                 "validation split scored on the real test split. Balanced accuracy is the mean recall over classes (a classifier that predicts "
                 "one class scores 1/C), AUC the macro one-vs-rest AUC; the intervals are 95 % bootstraps over the "
                 "test images (the test split's noise, not the classifier seed's).")
    n1 = min((s.get("num_images") or 0 for s in res.get("steps", {}).values()), default=0)
    if 0 < n1 < 2000:
        notes.append(f"Table 1 scores classifiers trained on only {n1} generated images each: differences of several "
                     "points between its rows are within the noise of one such run (the searches pick the best of "
                     "a few noisy trials on the validation split, so a step can score lower on the test split).")
    return notes


def _text(res: dict[str, Any], pngs: dict[str, bytes]) -> tuple[str, str]:
    t1, t2, pc = table1(res), table2(res), per_class_table(res)
    title = f"raysd report: {res['dataset']} ({res['preset']} preset)"
    notes = _notes(res)
    other = res.get("other_protocol")
    protocol = res.get("protocol", "paper")
    sections = [
        ("Table 1: CAS after each step", t1, None),
        (f"Table 2: real data against synthetic data at each scale ({protocol} protocol)", t2, "scaling"),
        *([(f"Table 2 under the {other['protocol']} protocol", table2(res, other["scaling"]), None)] if other else []),
        ("Hyper-parameter importance (fANOVA)", None, "importance"),
        ("Search 1: optimisation history", None, "search_1_history"),
        ("Search 2: optimisation history", None, "search_2_history"),
        ("Samples per class: real (left) and generated (right)", None, "samples"),
        ("Per-class accuracy (%) of every CAS", pc, "confusion"),
        ("Privacy audit: distance to the closest training image (RMS pixel difference in [0, 1]; cosine-like in "
         "features)", privacy_table(res), "audit"),
        ("Stage timings", None, "timings"),
    ]
    md = [f"# {title}", "", *[f"- {n}" for n in notes], ""]
    body = [f"<h1>{html.escape(title)}</h1><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    claims = two_sample_lines(res) + comparison_lines(res, f"{protocol} protocol: " if other else "")
    if other:
        claims += comparison_lines(other, f"{other['protocol']} protocol: ")
    if claims:  # what the numbers support, before the tables that show them
        heading = "What the numbers support (95 % intervals over the test images)"
        md += [f"## {heading}", "", *[f"- {c}" for c in claims], ""]
        body.append(f"<h2>{html.escape(heading)}</h2><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in claims)
                    + "</ul>")
    for heading, table, fig in sections:
        if table is None and (fig is None or fig not in pngs):
            continue
        md.append(f"## {heading}\n")
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if fig == "audit":
            lines = privacy_lines(res)
            md += [*[f"- {x}" for x in lines], ""]
            body.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
        if table is not None:
            md.append(table[0])
            body.append(table[1])
        if fig is not None and fig in pngs:
            md.append(f"![{fig}]({res['privacy']['picture']})\n" if fig == "audit" else
                      f"![{fig}](figures/{fig}.png)\n" if not fig.startswith("search_") else
                      f"![{fig}]({fig.split('_history')[0]}/optimization_history.png)\n")
            body.append(f'<img alt="{fig}" src="data:image/png;base64,{base64.b64encode(pngs[fig]).decode()}">')
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f3f3f3}"
             "img{max-width:100%;display:block;margin:1em 0}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    return "\n".join(md), page
