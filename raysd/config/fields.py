"""The machinery of the schema's fields: a setting's rule, help text and the stages it determines.

Each setting says which pipeline stages its value determines (:mod:`raysd.config.identity` builds
the stages' identities from that); :mod:`raysd.config.schema` declares the settings with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

Bound = float | str | None  # a number, or the dotted key of another setting


@dataclass(frozen=True)
class Rule:
    """Inclusive (ge/le) or exclusive (gt/lt) bounds; ``optional``: None is allowed;
    ``check(value, cfg) -> bool`` with ``text`` for what bounds cannot say."""

    ge: Bound = None
    gt: Bound = None
    le: Bound = None
    lt: Bound = None
    optional: bool = False
    check: Callable[[Any, Any], bool] | None = None
    text: str | None = None


# What a setting determines (its ``affects``): the pipeline stages whose outputs change with it. A
# stage's identity (its key in the manifest, the hash its checkpoints, search or set carry) is made
# of exactly these settings plus the fingerprints of the upstream outputs it uses
# (:mod:`raysd.config.identity`). ``OPERATIONAL`` settings change how work runs, never what it
# makes (batch sizes of inference and evaluation, compile, concurrency, resources, paths to the
# same data): changing one redoes nothing.
OPERATIONAL: tuple[str, ...] = ()
TRAINED = "trained"  # in a TrainStepConfig: the stage that section trains (encoder -> train_encoder, ...)
STAGES = ("prepare", "pretrain", "train_encoder", "after_1", "search_1", "finetune", "after_3", "search_2", "generate",
          "scaling", "audit", "report")
TRAINING = ("pretrain", "train_encoder", "finetune")
GENERATION = ("after_1", "search_1", "after_3", "search_2", "generate")  # every stage that makes images
CAS = ("after_1", "search_1", "after_3", "search_2", "scaling", "audit")  # every stage that trains a CAS classifier
SEARCHES = ("search_1", "search_2")
MADE = tuple(s for s in STAGES if s not in ("prepare", "report"))  # the seed: every stage after the data


def setting(default: Any = dataclasses.MISSING, help: str = "", *, affects: tuple[str, ...] | str,  # noqa: A002
            factory: Callable[[], Any] | None = None, when: Callable[[Any], bool] | None = None,
            views: dict[str, Callable[[Any], Any]] | None = None, **rule: Any) -> Any:
    """A config field with its help text, rule (see :class:`Rule`) and the stages it determines.

    ``affects``: stage names (or ``TRAINED``), ``OPERATIONAL`` for none. ``when(cfg, stage)``: the
    setting counts (for that stage; stage None: anywhere) only when this holds (e.g. ASHA's settings under ASHA). ``views``: what of the value a
    stage depends on (e.g. generation only on the largest scale)."""
    affects = tuple(dict.fromkeys((affects,) if isinstance(affects, str) else affects))
    unknown = [a for a in affects if a not in STAGES and a != TRAINED]
    if unknown:
        raise ValueError(f"setting affects unknown stages {unknown}")
    md = {"help": help, "rule": Rule(**rule) if rule else None, "affects": affects, "when": when,
          "views": dict(views or {})}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def section(factory: Callable[[], Any], help: str = "") -> Any:  # noqa: A002
    return field(default_factory=factory, metadata={"help": help, "rule": None})
