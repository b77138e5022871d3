"""Building a Config: defaults, then a preset, then a YAML/JSON file, then ``--set`` overrides,
each value coerced to its field's declared type; validated once at the end."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from raysd.config.presets import PRESETS
from raysd.config.schema import Config
from raysd.config.validation import validate, walk
from raysd.errors import RaysdError


def load_config(preset: str = "paper", *, file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                absolute_paths: bool = True) -> Config:
    """Defaults, then the preset, then a YAML/JSON file, then ``overrides``; validated.

    A file may be either nested (``{"encoder": {"epochs": 3}}``) or flat dotted keys; a saved
    ``config.json`` of a run loads back to an equal Config. Local paths (run directory, base
    model directory, tiny decoder, npz:/folder: datasets, data_dir) are made absolute: Ray's
    workers do not share the driver's working directory.
    """
    if preset not in PRESETS:
        raise RaysdError(f"config: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = Config(preset=preset)  # type: ignore[arg-type]
    apply_overrides(cfg, PRESETS[preset], source=f"preset {preset}")
    if file is not None:
        data = read_config_file(file)
        if "preset" in data and data["preset"] != preset:
            # A saved config carries its preset: start again from that one.
            return load_config(data["preset"], file=file, overrides=overrides, absolute_paths=absolute_paths)
        apply_overrides(cfg, flatten(data), source=str(file))
    apply_overrides(cfg, overrides or {}, source="overrides")
    if absolute_paths:
        absolutize_paths(cfg)
    validate(cfg)
    return cfg


def config_from_dict(saved: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """A Config from its ``to_dict()`` (a run's config.json), then ``overrides``; validated.

    A setting the saved config lacks (one added to raysd after the run was made) takes its schema
    default, which keeps what the raysd that made the run did; not the preset's value, which may
    choose a new behaviour for new runs."""
    return load_config(saved.get("preset", "paper"), overrides={**saved_overrides(saved), **(overrides or {})})


def saved_overrides(saved: dict[str, Any]) -> dict[str, Any]:
    """The dotted settings a saved config.json pins: its own values, schema defaults for the rest."""
    flat = {k: v for k, v in flatten(saved).items() if k != "preset"}
    return {**{k: v for k, v, _ in all_keys() if k != "preset" and k not in flat}, **flat}


def _is_uri(path: str) -> bool:
    return "://" in path


def absolutize_paths(cfg: Config) -> Config:
    """Make the config's local paths absolute (in place); URIs, hub ids and builtins stay."""

    def local(p: str) -> str:
        return p if _is_uri(p) or os.path.isabs(p) else os.path.abspath(os.path.expanduser(p))

    if cfg.run_dir.strip():
        cfg.run_dir = local(cfg.run_dir)
    for attr in ("base_model", "tiny_decoder"):
        v = getattr(cfg.model, attr)
        if v and not v.startswith(("tiny", "random:")) and not _is_uri(v) and os.path.exists(os.path.expanduser(v)):
            setattr(cfg.model, attr, local(v))  # a local directory (a hub id is no path here)
    name = cfg.dataset.name
    for prefix in ("npz:", "folder:"):
        if name.startswith(prefix) and name[len(prefix):]:
            cfg.dataset.name = prefix + local(name[len(prefix):])
    if cfg.dataset.data_dir:
        cfg.dataset.data_dir = local(cfg.dataset.data_dir)
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RaysdError(f"config: file {p} does not exist")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RaysdError(f"config: {p} is not a readable text file ({type(e).__name__})") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RaysdError(f"config: {p} is not valid {p.suffix.lstrip('.').upper() or 'JSON'}: {first}") from None
    if not isinstance(data, dict):
        raise RaysdError(f"config: {p} must hold a mapping of settings, not {type(data).__name__}")
    return data


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as JSON or YAML (by suffix)."""
    p = Path(path)
    d = cfg.to_dict()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        p.write_text(yaml.safe_dump(d, sort_keys=False))
    else:
        p.write_text(json.dumps(d, indent=2) + "\n")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; leaves dotted keys as they are."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any], *, source: str = "overrides") -> None:
    """Set dotted keys on ``cfg`` in place, coercing each value to its field's type."""
    for key, value in overrides.items():
        obj: Any = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or part not in _field_types(type(obj)):
                raise RaysdError(f"config: unknown key {key!r} (from {source}); {_known_keys_hint(key)}")
            obj = getattr(obj, part)
        name = parts[-1]
        types_ = _field_types(type(obj)) if dataclasses.is_dataclass(obj) else {}
        if name not in types_ or dataclasses.is_dataclass(getattr(obj, name)):
            raise RaysdError(f"config: unknown key {key!r} (from {source}); {_known_keys_hint(key)}")
        setattr(obj, name, coerce(value, types_[name], key))


def parse_set_flags(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` (the CLI's ``--set``) -> {"a.b": "1"}; values coerced later."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RaysdError(f"--set {item!r}: expected KEY=VALUE, e.g. --set encoder.epochs=3")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def all_keys(cfg: Config | None = None) -> list[tuple[str, Any, str]]:
    """Every dotted key with its default and type name (docs/configuration.md)."""
    cfg = cfg or Config()
    rows = []
    for key, value, f in walk(cfg):
        owner: Any = cfg
        for part in key.split(".")[:-1]:
            owner = getattr(owner, part)
        rows.append((key, value, type_name(_field_types(type(owner))[f.name])))
    return rows


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _known_keys_hint(key: str) -> str:
    section = key.split(".")[0]
    keys = [k for k, _, _ in all_keys() if k.startswith(section + ".")]
    if keys:
        return "known keys in this section: " + ", ".join(keys)
    return "sections: " + ", ".join(f.name for f in dataclasses.fields(Config))


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a Python value or a CLI string) to type ``tp`` or fail clearly."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_optional(value, tp, key)
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise RaysdError(f"config: {key} must be one of {list(args)}; got {value!r}")
    if origin is list:
        if isinstance(value, str):
            text = value.strip().strip("[]")
            value = [v for v in (s.strip() for s in text.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise _bad(value, tp, key)
        return [coerce(v, args[0], key) for v in value]
    return _SCALARS.get(tp, _refuse)(value, tp, key)


def _bad(value: Any, tp: Any, key: str) -> RaysdError:
    return RaysdError(f"config: {key} must be {type_name(tp)}; got {value!r}")


def _coerce_optional(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        if type(None) in args:
            return None
        raise _bad(value, tp, key)
    for a in args:
        if a is type(None):
            continue
        try:
            return coerce(value, a, key)
        except RaysdError:
            pass
    raise _bad(value, tp, key)


def _to_bool(value: Any, tp: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise _bad(value, tp, key)


def _to_int(value: Any, tp: Any, key: str) -> int:
    if isinstance(value, bool):
        raise _bad(value, tp, key)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise _bad(value, tp, key) from None
    raise _bad(value, tp, key)


def _to_float(value: Any, tp: Any, key: str) -> float:
    if isinstance(value, bool):
        raise _bad(value, tp, key)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise _bad(value, tp, key) from None
    if out != out or out in (float("inf"), float("-inf")):
        raise RaysdError(f"config: {key} must be a finite number; got {value!r}")
    return out


def _to_str(value: Any, tp: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    raise _bad(value, tp, key)


def _refuse(value: Any, tp: Any, key: str) -> Any:  # pragma: no cover - a field type this coercer does not know
    raise _bad(value, tp, key)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
