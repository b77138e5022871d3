"""Pretrained bases kept for later runs (``model.base_cache``, the small preset's pretraining).

A base pretrained in a run (the pretrain stage) is copied to ``BASE_CACHE/KEY/``, KEY being the
pretrain stage's key: the fingerprint of the prepared data and of every setting that determines
the pretraining (model size, resolution, steps, batch, learning rate, seed). A later run whose
pretrain stage has the same key copies it into its own run directory (``RUN/base``) instead of
training it again, after checking every file against the SHA-256 its record lists; a damaged
entry is named and ignored (the base is trained again and the entry rewritten). The run
directory stays self-contained; the cache only saves time. Writing the cache is best effort: a
cache that cannot be written costs a line, never the run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from raysd.data import storage
from raysd.data.models import BASE_META, publish_base, verify_base_dir
from raysd.run.rundir import Run

log = logging.getLogger("raysd")
RECORD = "raysd_pretrain.json"  # the pretrain stage's outputs, written last: the entry is complete


def entry(run: Run, key: str) -> Path | None:
    root = run.cfg.model.base_cache
    return Path(os.path.expanduser(root)) / key if root else None


def take(run: Run, key: str) -> dict[str, Any] | None:
    """The pretrain stage's outputs, the base copied into the run, when the cache holds it intact."""
    where = entry(run, key)
    if where is None or not (where / RECORD).is_file():
        return None
    problems = verify_base_dir(where)
    if problems:
        log.warning("base cache: %s is damaged (%s); pretraining again", where, problems[0])
        return None
    publish_base(str(where), run.base_dir)
    result = {**json.loads((where / RECORD).read_text()), "base": run.base_spec(), "cached_from": str(where)}
    log.info("pretrain: the base pretrained on this data with these settings is kept in %s: copied, not trained "
             "again (key %s)", where, key)
    return result


def keep(run: Run, key: str, result: dict[str, Any]) -> None:
    """Copy the run's freshly pretrained base to the cache (best effort)."""
    where = entry(run, key)
    if where is None:
        return
    tmp = where.with_name(where.name + ".partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        record = storage.read_json(storage.join(run.base_dir, BASE_META))
        for rel in [*record.get("files", {}), BASE_META]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(storage.read_bytes(storage.join(run.base_dir, rel)))
        (tmp / RECORD).write_text(json.dumps({k: v for k, v in result.items() if k != "base"}, indent=2))
        shutil.rmtree(where, ignore_errors=True)
        tmp.rename(where)
        log.info("pretrain: base kept in %s for later runs on the same data and settings (key %s)", where, key)
    except OSError as e:
        log.warning("base cache: could not keep the base in %s (%s); later runs will pretrain again", where, e)
        shutil.rmtree(tmp, ignore_errors=True)
