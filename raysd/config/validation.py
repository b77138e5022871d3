"""Validation of a whole Config against the rules in its fields' metadata (schema.py): one place,
one message format naming the key, the value, the rule and how to set it."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from raysd.config.schema import Config, Rule, get
from raysd.errors import RaysdError


def walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, value, field) of every leaf setting, in declaration order."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from walk(v, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, v, f


def _bound(b: float | str, cfg: Config) -> tuple[float, str]:
    """(value, shown text) of a bound that is a number or the key of another setting."""
    if isinstance(b, str):
        v = get(cfg, b)
        return v, f"{b}={_num(v)}"
    return b, _num(b)


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def rule_text(rule: Rule, cfg: Config) -> str:
    """'in [1, model.num_train_timesteps=1000]', '>= 1 or none', or the rule's own text."""
    if rule.text:
        text = rule.text
    else:
        lo = rule.ge if rule.ge is not None else rule.gt
        hi = rule.le if rule.le is not None else rule.lt
        if lo is not None and hi is not None:
            text = (f"in {'[' if rule.ge is not None else '('}{_bound(lo, cfg)[1]}, {_bound(hi, cfg)[1]}"
                    f"{']' if rule.le is not None else ')'}")
        elif lo is not None:
            text = f"{'>=' if rule.ge is not None else '>'} {_bound(lo, cfg)[1]}"
        else:
            text = f"{'<=' if rule.le is not None else '<'} {_bound(hi, cfg)[1]}"
    return text + (" or none" if rule.optional else "")


def satisfies(rule: Rule, value: Any, cfg: Config) -> bool:
    if value is None:
        return rule.optional
    checks = [(rule.ge, lambda b: value >= b), (rule.gt, lambda b: value > b), (rule.le, lambda b: value <= b),
              (rule.lt, lambda b: value < b)]
    if any(b is not None and not ok(_bound(b, cfg)[0]) for b, ok in checks):
        return False
    return rule.check is None or bool(rule.check(value, cfg))


def check_value(key: str, value: Any, cfg: Config) -> None:
    """Refuse ``value`` for ``key`` in one line when its rule does not hold (used by the CLI's flags too)."""
    _require(key, value, field_of(key).metadata.get("rule"), cfg)


def _require(key: str, value: Any, rule: Rule | None, cfg: Config) -> None:
    if rule is not None and not satisfies(rule, value, cfg):
        raise RaysdError(f"config: {key} must be {rule_text(rule, cfg)}; got {value!r} (set it with --set {key}=...)")


def field_of(key: str) -> dataclasses.Field:
    obj: Any = Config()
    parts = key.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    return {f.name: f for f in dataclasses.fields(obj)}[parts[-1]]


def validate(cfg: Config) -> None:
    """Reject impossible settings up front, before any work starts."""
    for key, value, f in walk(cfg):
        _require(key, value, f.metadata.get("rule"), cfg)
