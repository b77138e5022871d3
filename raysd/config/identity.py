"""What makes a stage's output what it is: the settings each stage's output depends on, read from
the schema (every setting says which stages it determines, or that it is operational), as one
dictionary per stage. Stage keys, training hashes, search fingerprints and set fingerprints are
all built from these dictionaries plus the fingerprints of the upstream outputs they use, so a
setting that cannot change an output never redoes it, and one that can always does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raysd.config.schema import OPERATIONAL, STAGES, TRAINED, Config
from raysd.config.validation import walk

# The stage a TrainStepConfig section trains (its settings say TRAINED)
SECTION_STAGE = {"encoder": "train_encoder", "finetune": "finetune"}


def affected_stages(key: str, f: dataclasses.Field) -> tuple[str, ...]:
    """The stages the setting ``key`` determines (empty: operational)."""
    section = key.split(".")[0]
    return tuple(SECTION_STAGE[section] if a == TRAINED else a for a in f.metadata.get("affects", OPERATIONAL))


def settings_identity(cfg: Config, stage: str) -> dict[str, Any]:
    """{dotted key: value} of every setting that determines ``stage``'s output, as that stage
    sees it (a view: e.g. generation depends only on the largest scale)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    out: dict[str, Any] = {}
    for key, value, f in walk(cfg):
        if stage not in affected_stages(key, f):
            continue
        when = f.metadata.get("when")
        if when is not None and not when(cfg):
            continue
        view = f.metadata.get("views", {}).get(stage)
        out[key] = view(value) if view is not None else value
    return out


def operational_keys(cfg: Config | None = None) -> list[str]:
    return [k for k, _, f in walk(cfg or Config()) if not affected_stages(k, f)]


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key old -> new' for every setting whose value differs (or that one side lacks)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a != b:
            out.append(f"{key} {_show(a)} -> {_show(b)}")
    return out


def _show(v: Any) -> str:
    text = str(v) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."
