"""Stage identity comes from one place, the schema: every setting says which stages' outputs it
determines (or that it is operational), and the stage keys, the training hashes and the
generator's identity all follow it. A walk over every setting changes each one alone."""

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest

from conftest import make_tiny_run
from raysd import pipeline
from raysd.config import Config, load_config
from raysd.config.identity import affected_stages, changed_settings, operational_keys
from raysd.config.loading import _field_types
from raysd.config.schema import STAGES, get
from raysd.config.validation import validate, walk
from raysd.errors import RaysdError
from raysd.run.generators import resolve_spec, spec_identity
from raysd.run.rundir import Run, check_claim, claim

LEGACY = Path(__file__).parent / "data" / "legacy-demo-40e5066"


def _outputs() -> dict:
    """Upstream outputs as a completed run records them (values only need to be stable)."""
    best = {"num_inference_steps": 5, "guidance_scale": 2.0, "encoder_epoch": 1, "unet_epoch": 1, "epoch": 1}
    return {"prepare": {"fingerprint": "data"}, "pretrain": {"base_sha256": "base"},
            "train_encoder": {"checkpoints": {"1": "e1"}}, "search_1": {"best": dict(best)},
            "finetune": {"checkpoints": {"1": "u1"}, "encoder_epoch": 1}, "search_2": {"best": dict(best)},
            "generate": {"fingerprint": "set"}}


def _keys(cfg: Config) -> dict[str, str]:
    out = _outputs()
    return {s.name: s.key(cfg, out) for s in pipeline.STAGES if s.name != "report"}


def _other_value(cfg: Config, key: str):
    """Another valid value for ``key`` (the config must still validate)."""
    owner = cfg
    for part in key.split(".")[:-1]:
        owner = getattr(owner, part)
    tp = _field_types(type(owner))[key.rsplit(".", 1)[-1]]
    value = get(cfg, key)
    special = {"dataset.name": "cifar10", "model.base_model": "tiny-vae", "model.tiny_decoder": "random:taesd",
               "run_dir": "/tmp/elsewhere", "storage_endpoint": "http://127.0.0.1:9", "dataset.data_dir": "/mnt/data",
               "resources.accelerator": "TPU", "scale.scales": [1, 2, 3], "preset": "paper",
               "model.beta_end": 0.02, "cas.min_lr": 1e-6, "search.max_inference_steps": 7, "model.resolution": 24,
               "finetune.lora_targets": ["to_q"]}
    if key in special:
        return special[key]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in args if a != value)
    if type(None) in args:  # optional: None <-> a value
        return None if value is not None else (8 if int in args else 1.0)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if 0 < value < 1 else value + 1.0
    raise AssertionError(f"no other value for {key} ({tp})")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared run with one encoder checkpoint (no Ray): the consumers of identity need real records."""
    return make_tiny_run(tmp_path_factory.mktemp("identity"), **{"model.pretrain_steps": 0})


def test_every_setting_says_what_it_determines():
    for key, _, f in walk(Config()):
        assert "affects" in f.metadata, key
        assert set(affected_stages(key, f)) <= set(STAGES), key
    assert set(operational_keys()) >= {"sampling.batch_size", "cas.eval_batch_size", "search.max_concurrent_trials",
                                       "cas.compile", "sampling.compile", "sampling.fuse_qkv", "run_dir",
                                       "encoder.gradient_checkpointing", "finetune.gradient_checkpointing",
                                       "dataset.data_dir"}


def test_the_settings_walk(tiny):
    """Each setting changed alone: an operational one changes no stage key, no training hash and
    not the generator's identity; an identity one changes exactly the keys of the stages it
    determines, the training hash of each training stage among them, and the generator's
    identity when it determines the generation."""
    base = tiny
    run = Run(base)
    keys = _keys(base)
    hashes = {k: run.training_hash(k, 1 if k == "unet" else None) for k in ("encoder", "unet")}
    spec = spec_identity(resolve_spec(run, num_inference_steps=3, guidance_scale=2.0, best={}))
    checked = 0
    for key, _, f in walk(base):
        cfg = load_config(base.preset, overrides={k: v for k, v in _flat(base).items() if k != "preset"})
        _set(cfg, key, _other_value(cfg, key))
        validate(cfg)
        declared = set(affected_stages(key, f))
        when = f.metadata.get("when")
        if when is not None and not when(cfg):
            declared = set()
        got = {s for s, k in _keys(cfg).items() if k != keys[s]}
        assert got == declared - {"report"}, (key, got, declared)
        checked += 1
        if key == "run_dir":  # another directory holds no run to hash: the stage keys above say it
            continue
        r = Run(cfg)
        for kind, stage in (("encoder", "train_encoder"), ("unet", "finetune")):
            changed = r.training_hash(kind, 1 if kind == "unet" else None) != hashes[kind]
            assert changed == (stage in declared), (key, kind)
        if not key.startswith(("scale.", "run_dir", "dataset.")):  # sets add scale.*; data is the run's
            other = spec_identity(resolve_spec(r, num_inference_steps=3, guidance_scale=2.0, best={}))
            assert (other != spec) == ("generate" in declared), (key, other, spec)
    assert checked == len(list(walk(base)))


def _flat(cfg: Config) -> dict:
    from raysd.config import flatten

    return flatten(cfg.to_dict())


def _set(cfg: Config, key: str, value) -> None:
    owner = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    setattr(owner, parts[-1], value)


def test_asha_settings_count_only_under_asha(tiny):
    hb = _keys(tiny)
    cfg = load_config(tiny.preset, overrides={**{k: v for k, v in _flat(tiny).items() if k != "preset"},
                                              "search.grace_period": 2})
    assert _keys(cfg) == hb  # HyperBand has no grace period
    asha = load_config(tiny.preset, overrides={**{k: v for k, v in _flat(tiny).items() if k != "preset"},
                                               "search.scheduler": "asha"})
    asha2 = load_config(tiny.preset, overrides={**{k: v for k, v in _flat(asha).items() if k != "preset"},
                                                "search.grace_period": 2})
    assert {s for s, k in _keys(asha2).items() if k != _keys(asha)[s]} == {"search_1", "search_2"}


def test_a_claim_names_the_changed_settings_and_takes_an_earlier_raysds_record(tmp_path):
    d = str(tmp_path / "ckpts")
    claim(d, "new", what="encoder", identity={"encoder.lr": 0.01, "seed": 0})
    with pytest.raises(RaysdError, match=r"other settings \(encoder.lr 0.01 -> 0.02\)"):
        check_claim(d, "other", what="encoder", identity={"encoder.lr": 0.02, "seed": 0})
    (tmp_path / "ckpts" / "claim.json").write_text(json.dumps({"fingerprint": "old-scheme"}))
    (tmp_path / "ckpts" / "epoch_001").mkdir()
    claim(d, "new", what="encoder", aliases=("old-scheme",), identity={"encoder.lr": 0.01})
    assert json.loads((tmp_path / "ckpts" / "claim.json").read_text())["fingerprint"] == "new"
    assert (tmp_path / "ckpts" / "epoch_001").is_dir()  # accepted, nothing removed


def test_changed_settings_lines():
    assert changed_settings({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b 2 -> 3", "c (unset) -> 4"]


# --------------------------------------------------------------------------------------------
# A run directory written by raysd 40e5066 (the scheme before this one)


@pytest.fixture
def legacy_run(tmp_path):
    """The records of a demo run made by raysd 40e5066 (`raysd run`, defaults), without its weights
    and images: what the pipeline reads to decide what to skip."""
    if not LEGACY.is_dir():
        pytest.skip(f"{LEGACY} is absent")
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    return run


def test_a_run_of_the_previous_scheme_skips_every_stage(legacy_run, ray_session, capsys):
    """`raysd run --out RUN` on it (no flags but the audit's): every stage skipped, the records given the
    current keys; a changed setting is then named against them, and nothing is written."""
    from raysd.cli import main

    before = json.loads((legacy_run / "manifest.json").read_text())
    assert "key_scheme" not in before
    stamps = {p: p.stat().st_mtime_ns for p in legacy_run.rglob("*") if p.is_file()}
    # audit.enabled=false: the audit stage, added since, would read the set's images, not kept here
    assert main(["run", "--out", str(legacy_run), "--set", "audit.enabled=false"]) == 0
    err = capsys.readouterr().err
    assert all(f"run: {s} complete, skipped" in err for s in before["stages"]), err[-3000:]
    after = json.loads((legacy_run / "manifest.json").read_text())
    assert after["key_scheme"] == pipeline.KEY_SCHEME and all("identity" in r for r in after["stages"].values())
    assert {k: r["finished_at"] for k, r in after["stages"].items()} == {
        k: r["finished_at"] for k, r in before["stages"].items()}  # nothing ran again
    changed = {p.name for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert changed <= {"manifest.json", "config.json"}, changed

    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in legacy_run.rglob("*") if p.is_file()}
    assert main(["run", "--out", str(legacy_run), "--set", "encoder.lr=0.02"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "encoder.lr 0.01 -> 0.02" in line and "train_encoder (" in line and "--redo" in line, line
    assert all(s in line for s in ("after_1", "search_1", "finetune", "generate", "scaling", "report")), line
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in legacy_run.rglob("*") if p.is_file()} == stamps
