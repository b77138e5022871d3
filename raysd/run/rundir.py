"""The run directory as one object, built once per stage: its layout, the prepared splits' metas
(read once, then cached), the fingerprints of what a stage depends on, and the one way to
claim an output directory for a fingerprint.

    RUN/config.json                 the resolved Config of the run
    RUN/data/{train,val,test}/      the real dataset as canonical Parquet sets
    RUN/base/                       demo only: the tiny base after unconditional pretraining
    RUN/cache/latents-KEY/          VAE posteriors of the train split (mean, logvar)
    RUN/checkpoints/{pretrain,encoder,unet}/epoch_NNN/
    RUN/search_1/, RUN/search_2/    Ray Tune experiments and their summaries
    RUN/synthetic/NAME/             generated sets
    RUN/manifest.json, results.json, report.md, report.html, figures/
"""

from __future__ import annotations

from typing import Any

from raysd.config import Config, fingerprint
from raysd.core.plan import Plan, class_counts, make_plan
from raysd.data import imageset, storage
from raysd.errors import RaysdError

SPLITS = ("train", "val", "test")
# The pipeline's stages in order (raysd.pipeline defines them; listed here so the CLI needs no torch)
PIPELINE_STAGES = ("prepare", "pretrain", "train_encoder", "after_1", "search_1", "finetune", "after_3", "search_2",
                   "generate", "scaling", "audit", "report")
CLAIM = "claim.json"


class Run:
    """One run directory and its config. Picklable: stages hand it to Ray workers as it is."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.root = cfg.run_dir
        self._metas: dict[str, dict[str, Any]] = {}

    # -- layout --------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def data_dir(self) -> str:
        return self.path("data")

    def split_dir(self, split: str) -> str:
        return self.path("data", split)

    @property
    def base_dir(self) -> str:
        return self.path("base")

    def cache_dir(self, key: str) -> str:
        return self.path("cache", f"latents-{key}")

    def ckpt_root(self, kind: str) -> str:
        return self.path("checkpoints", kind)

    def search_dir(self, phase: int) -> str:
        return self.path(f"search_{phase}")

    def synthetic_dir(self, name: str) -> str:
        return self.path("synthetic", name)

    # -- the prepared real data (read once) -----------------------------------------------------

    def is_prepared(self) -> bool:
        return all(imageset.is_complete(self.split_dir(s)) for s in SPLITS)

    def meta(self, split: str) -> dict[str, Any]:
        """The split's meta.json (counts, classes, image shape, provenance), cached."""
        if split not in self._metas:
            self._metas[split] = imageset.read_meta(self.split_dir(split))
        return self._metas[split]

    @property
    def train_meta(self) -> dict[str, Any]:
        return self.meta("train")

    @property
    def num_classes(self) -> int:
        return int(self.train_meta["num_classes"])

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.train_meta["image_shape"][:2]
        return int(h), int(w)

    @property
    def num_train(self) -> int:
        return int(self.train_meta["num_rows"])

    def read_split(self, split: str) -> imageset.ImageSet:
        return imageset.read_set(self.split_dir(split))

    def plan(self, num_images: int, class_balance: str) -> Plan:
        """Sample ids, labels and seeds of a synthetic set of ``num_images`` for this run."""
        m = self.train_meta
        return make_plan(num_images, class_counts(num_images, m["num_classes"], class_balance, m["counts_per_class"]),
                         self.cfg.seed)

    # -- identities ----------------------------------------------------------------------------

    def base_spec(self) -> str:
        """The base model the stages load: the pretrained demo base in the run, or the config's."""
        if self.cfg.model.pretrain_steps > 0:
            return storage.local_path(self.base_dir)
        return self.cfg.model.base_model

    def stage_hash(self, *sections: str, extra: Any = None) -> str:
        """Identity of a stage's inputs: named config sections, the seed and any extra value (the
        latent cache: base, resolution and data as ``extra``, no section)."""
        d = self.cfg.to_dict()
        body = {k: d[k] for k in sections}
        body["seed"] = self.cfg.seed
        body["extra"] = extra
        return fingerprint(body)

    def base_identity(self) -> str:
        """The content identity of the base the stages load (the pretrained one in the run, or the config's)."""
        from raysd.data.models import base_content

        return base_content(self.base_spec())

    def settings_identity(self, stage: str) -> dict[str, Any]:
        """The settings that determine ``stage``'s output (the schema's), the base model by content."""
        return stage_settings(self.cfg, stage)

    def training_hash(self, kind: str, encoder_epoch: int | None = None) -> str:
        """What a training kind's checkpoints depend on (a change invalidates them): the settings
        that determine its stage, the prepared data, the base and, for the UNet, the frozen
        Class-Encoder's weights."""
        stage = {"pretrain": "pretrain", "encoder": "train_encoder", "unet": "finetune"}[kind]
        body: dict[str, Any] = {"settings": self.settings_identity(stage),
                                "data": self.train_meta["provenance"].get("fingerprint")}
        if kind != "pretrain":
            body["base"] = self.base_identity()
        if kind == "unet":
            from raysd.data import checkpoints as ck

            body["encoder_epoch"] = encoder_epoch
            body["encoder_sha256"] = ck.weights_sha(ck.epoch_dir(self.ckpt_root("encoder"), int(encoder_epoch or 0)))
        return fingerprint(body)

    def legacy_training_hash(self, kind: str, encoder_epoch: int | None = None) -> str:
        """The hash an earlier raysd (before the schema's stage identity) gave these checkpoints."""
        from raysd.run import legacy

        return legacy.training_hash(self.cfg, kind, encoder_epoch)

    def check_preset(self) -> None:
        """Refuse, before anything is written, a run directory made with another preset."""
        path = self.path("config.json")
        if storage.exists(path):
            old = storage.read_json(path)
            if old.get("preset") != self.cfg.preset:
                raise RaysdError(f"run {self.root} was made with preset {old.get('preset')!r}, not "
                                 f"{self.cfg.preset!r}; use another run directory")

    def save_config(self) -> None:
        """Write RUN/config.json (the resolved config), refusing a run made with another preset."""
        self.check_preset()
        storage.makedirs(self.root)
        storage.write_json(self.path("config.json"), self.cfg.to_dict())


def stage_settings(cfg: Config, stage: str) -> dict[str, Any]:
    """:func:`raysd.config.identity.settings_identity`, with ``model.base_model`` by its content (a
    raysd-written base moved to another path or bucket is the same base)."""
    from raysd.config.identity import settings_identity
    from raysd.data.models import base_content

    out = settings_identity(cfg, stage)
    if "model.base_model" in out:
        out["model.base_model"] = base_content(out["model.base_model"])
    return out


def claim(directory: str, fp: str, *, what: str, restart: bool = False, record: str = CLAIM,
          body: dict[str, Any] | None = None, aliases: tuple[str, ...] = (), identity: dict[str, Any] | None = None,
          fix: str = "pass --restart to replace it, or use another run directory or --name") -> None:
    """Make ``directory`` the output of the work identified by ``fp`` (recorded in ``record``).

    Held for other settings: refused with one line naming them (``identity``: the settings behind
    ``fp``, recorded beside it), or, with ``restart``, emptied and taken. ``restart`` also empties
    a directory held for the same settings (the user asked to redo it). A record holding one of
    ``aliases`` (the same work identified the way an earlier raysd did) is taken as ``fp`` and
    rewritten so. A non-empty directory without the record is not raysd's and is refused."""
    check_claim(directory, fp, what=what, restart=restart, record=record, aliases=aliases, identity=identity, fix=fix)
    path = storage.join(directory, record)
    held = storage.read_json(path) if storage.exists(path) else None
    if restart and (held is not None or storage.listdir(directory)):
        storage.remove(directory)
        held = None
    storage.makedirs(directory)
    if held is None or held.get("fingerprint") != fp:
        kept = {k: v for k, v in (held or {}).items() if k not in ("fingerprint", "identity")}
        storage.write_json(path, {**kept, "fingerprint": fp, **({"identity": identity} if identity else {}),
                                  **(body or {})})


def check_claim(directory: str, fp: str, *, what: str, restart: bool = False, record: str = CLAIM,
                aliases: tuple[str, ...] = (), identity: dict[str, Any] | None = None,
                fix: str = "pass --restart to replace it, or use another run directory or --name") -> None:
    """What :func:`claim` would refuse, checked without writing anything."""
    from raysd.config.identity import changed_settings

    if restart:
        return
    path = storage.join(directory, record)
    if storage.exists(path):
        held = storage.read_json(path)
        if held.get("fingerprint") not in (fp, *aliases):
            diff = changed_settings(held["identity"], identity) if identity and held.get("identity") else []
            why = f" ({'; '.join(diff)})" if diff else (
                " (the same settings, made from other data, base or upstream checkpoints)" if identity and
                held.get("identity") else "")
            raise RaysdError(f"{what}: {directory} holds work made with other settings{why}; {fix}")
    elif storage.listdir(directory):
        raise RaysdError(f"{what}: {directory} exists and is not a raysd {what} directory; remove it, or {fix}")
