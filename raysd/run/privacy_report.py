"""The report's privacy-audit section: the audit's table and sentences (results.json's ``privacy``)."""

from __future__ import annotations

from typing import Any

from raysd.run.tables import grid, pct


def privacy_table(res: dict[str, Any]) -> tuple[str, str] | None:
    """The audit's distances to the closest training image, the synthetic set's against the held-out
    real images' (the baseline), in pixel and feature space."""
    a = res.get("privacy")
    if not a:
        return None
    rows = []
    for space in ("pixel", "feature"):
        s = a[space]
        for who, q, share, mem in (("synthetic", s["synthetic"], s["share_closer"], s["memorised"]),
                                   ("held-out real (test)", s["held_out"], s["held_out_share_closer"],
                                    s["held_out_memorised"])):
            rows.append([space, who, f"{q['p1']:.4f}", f"{q['p5']:.4f}", f"{q['median']:.4f}", pct(share), pct(mem)])
    return grid(["space", "images", "1st percentile", "5th percentile", "median", "% below the threshold",
                 "% memorised (ratio < 1/3)"], rows)


def privacy_lines(res: dict[str, Any]) -> list[str]:
    """The audit's verdict, its rule, and the membership-inference and near-duplicate figures."""
    a = res.get("privacy")
    if not a:
        return []
    v, m, d = a["verdict"], a["membership"], a["duplicates"]
    syn = next(k for k in m if k not in ("real", "members", "nonmembers"))

    def auc(k: str) -> str:
        lo, hi = m[k]["interval"]
        return f"{m[k]['auc']:.3f} ({lo:.3f} to {hi:.3f})"

    return [f"Verdict: {'FLAGGED' if v['flagged'] else 'passed'}: {100 * v['share']:.2f} % of the {a['images']} images "
            f"of {a['set'].rstrip('/').split('/')[-1]} are near-copies; the rule: {v['rule']}.",
            f"Membership inference by a loss threshold (members: the {m['members']} train images; non-members: the "
            f"{m['nonmembers']} test images; 0.5: nothing leaks; 95 % bootstrap intervals): AUC {auc('real')} for the "
            f"classifier trained on real data, {auc(syn)} for the one trained on {syn}.",
            f"Near-duplicates inside the set: {100 * d['share']:.2f} % of its first {d['images']} images have another "
            f"closer than the threshold; {100 * d.get('real_share', float('nan')):.2f} % of as many real training "
            "images do.",
            f"Cost: {a['seconds']['classifiers']:.0f} s for the two classifiers, {a['seconds']['total']:.0f} s in all."]
