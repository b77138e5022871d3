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
    """{dotted key: value} of every setting that determines ``stage``'s output and is not at its
    schema default, as that stage sees it (a view: e.g. generation depends only on the largest
    scale). Settings at their defaults are left out, so a setting added to raysd later (its
    default keeping what raysd did before) changes no key of an existing run. A default, once
    released, is therefore never changed: a new behaviour is a new value, not a new default."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    defaults = schema_defaults()
    out: dict[str, Any] = {}
    for key, value, f in walk(cfg):
        if stage not in affected_stages(key, f):
            continue
        when = f.metadata.get("when")
        if when is not None and not when(cfg, stage):
            continue
        view = f.metadata.get("views", {}).get(stage)
        seen, default = (view(value), view(defaults[key])) if view is not None else (value, defaults[key])
        if seen != default:
            out[key] = seen
    return out


_DEFAULTS: dict[str, Any] = {}


def schema_defaults() -> dict[str, Any]:
    """{dotted key: default} of the schema (the paper's settings)."""
    if not _DEFAULTS:
        _DEFAULTS.update({k: v for k, v, _ in walk(Config())})
    return _DEFAULTS


def operational_keys(cfg: Config | None = None) -> list[str]:
    return [k for k, _, f in walk(cfg or Config()) if not affected_stages(k, f)]


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key old -> new' for every setting whose value differs (one an identity leaves out is at its default)."""
    defaults = schema_defaults()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, defaults.get(key, "(unset)")), new.get(key, defaults.get(key, "(unset)"))
        if a != b:
            out.append(f"{key} {_show(a)} -> {_show(b)}")
    return out


def _show(v: Any) -> str:
    text = str(v) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."
