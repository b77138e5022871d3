import json

import pytest

from raysd import config as C
from raysd.errors import RaysdError


def test_paper_defaults_match_design():
    cfg = C.load_config("paper")
    assert cfg.model.base_model == "stabilityai/stable-diffusion-2-base" and cfg.model.seq_len == 77
    assert (cfg.encoder.epochs, cfg.encoder.global_batch_size, cfg.encoder.lr) == (50, 64, 1e-4)
    assert (cfg.encoder.weight_decay, cfg.encoder.grad_clip_norm) == (4e-3, 10.0)
    assert (cfg.finetune.epochs, cfg.finetune.global_batch_size, cfg.finetune.lr) == (10, 16, 1e-5)
    assert (cfg.search.num_trials, cfg.search.num_images) == (50, 4000)
    assert (cfg.search.min_inference_steps, cfg.search.max_inference_steps, cfg.search.max_guidance_scale) == (5, 50, 7.5)
    assert (cfg.cas.max_epochs, cfg.cas.batch_size, cfg.cas.lr, cfg.cas.eps) == (100, 256, 1e-3, 1e-7)
    assert (cfg.cas.plateau_patience, cfg.cas.early_stopping_patience, cfg.cas.min_lr) == (10, 25, 1e-5)
    assert cfg.scale.scales == list(range(1, 11))
    assert (cfg.model.beta_start, cfg.model.beta_end, cfg.model.num_train_timesteps) == (0.00085, 0.012, 1000)


def test_presets_are_data_and_differ():
    off = C.load_config("official")
    assert off.model.base_model == "CompVis/stable-diffusion-v1-4" and off.model.seq_len == 100
    demo = C.load_config("demo")
    assert demo.dataset.name == "digits" and demo.model.base_model == "builtin:tiny-digits" and demo.preset == "demo"
    assert demo.model.pretrain_steps == 0 and demo.resources.device == "auto" and demo.cas.image_size == 16
    assert set(C.PRESETS) == {"demo", "small", "paper", "official"}
    small = C.load_config("small", overrides={"dataset.name": "retinamnist"})  # the demo's budgets, a base of its own
    assert small.model.base_model == "tiny" and small.model.pretrain_steps == 2400 and small.cas.image_size is None
    assert small.encoder.epochs == demo.encoder.epochs and small.cas.strong_flip and small.preset == "small"


def test_cpu_processes_of_the_demo():
    """On CPUs the demo fine-tunes with one-thread data-parallel workers and generates with one-thread
    actors; on GPUs training keeps num_workers (one per GPU)."""
    from raysd.stages.generate import cpu_actor_threads

    demo = C.load_config("demo")
    r = demo.resources
    assert [r.train_workers(k, d) for k in ("encoder", "unet") for d in ("cpu", "cuda")] == [1, 1, 2, 1]
    assert r.torch_threads == 2  # a worker alone on 2 cores takes both (worker_threads splits them)
    assert cpu_actor_threads(r.torch_threads, 2, r.cpu_generation_actors) == 1
    assert cpu_actor_threads(r.torch_threads, 8, r.cpu_generation_actors) == 2
    paper = C.load_config("paper", overrides={"resources.num_workers": "4"})
    assert paper.resources.train_workers("unet", "cpu") == paper.resources.train_workers("unet", "cuda") == 4
    with pytest.raises(RaysdError, match="cpu_finetune_workers"):
        C.load_config("demo", overrides={"resources.cpu_finetune_workers": "0"})


def test_overrides_are_coerced_from_strings():
    cfg = C.load_config("paper", overrides=C.parse_set_flags(
        ["encoder.epochs=3", "sampling.guidance_scale=2.5", "model.null_class=yes", "scale.scales=1,2,4",
         "search.max_concurrent_trials=none", "sampling.scheduler=dpmpp"]))
    assert cfg.encoder.epochs == 3 and cfg.sampling.guidance_scale == 2.5 and cfg.model.null_class is True
    assert cfg.scale.scales == [1, 2, 4] and cfg.search.max_concurrent_trials is None
    assert cfg.sampling.scheduler == "dpmpp"


@pytest.mark.parametrize("key,value,needle", [
    ("encoder.epochs", "-1", "encoder.epochs must be >= 1"),
    ("sampling.num_inference_steps", "0", "sampling.num_inference_steps must be in [1, model.num_train_timesteps=1000]"),
    ("sampling.guidance_scale", "-0.5", "sampling.guidance_scale must be in [0, 100]"),
    ("sampling.guidance_scale", "101", "sampling.guidance_scale must be in [0, 100]"),
    ("dataset.name", "imagenet", "dataset.name must be a registered dataset, npz:PATH or folder:PATH; got 'imagenet'"),
    ("encoder.epochs", "three", "encoder.epochs must be int"),
    ("sampling.scheduler", "euler", "must be one of ['ddim', 'dpmpp', 'unipc']"),
    ("encoder.epoch", "3", "unknown key 'encoder.epoch'"),
    ("nonsense.key", "1", "unknown key 'nonsense.key'"),
    ("cas.lr", "nan", "cas.lr must be a finite number"),
    ("scale.scales", "0,2", "scale.scales must be a non-empty list"),
    ("encoder", "3", "unknown key 'encoder'"),
])
def test_invalid_values_are_rejected_with_one_line(key, value, needle):
    with pytest.raises(RaysdError) as e:
        C.load_config("paper", overrides={key: value})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_save_and_load_round_trip(tmp_path):
    cfg = C.load_config("demo", overrides={"encoder.epochs": 7, "seed": 3})
    for name in ("c.json", "c.yaml"):
        C.save_config(cfg, tmp_path / name)
        back = C.load_config("paper", file=tmp_path / name)  # the file's preset wins
        assert back == cfg and back.hash() == cfg.hash()


def test_flat_and_nested_files(tmp_path):
    (tmp_path / "f.json").write_text(json.dumps({"encoder.epochs": 4, "cas": {"variant": "standard"}}))
    cfg = C.load_config("paper", file=tmp_path / "f.json")
    assert cfg.encoder.epochs == 4 and cfg.cas.variant == "standard"


def test_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RaysdError, match="not valid JSON"):
        C.load_config("paper", file=tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RaysdError, match="must hold a mapping"):
        C.load_config("paper", file=tmp_path / "list.yaml")
    with pytest.raises(RaysdError, match="does not exist"):
        C.load_config("paper", file=tmp_path / "missing.yaml")
    with pytest.raises(RaysdError, match="unknown preset"):
        C.load_config("fast")


def test_hash_depends_on_sections():
    a = C.load_config("paper")
    b = C.load_config("paper", overrides={"cas.lr": 0.01})
    assert a.hash() != b.hash()
    assert a.hash("model", "encoder") == b.hash("model", "encoder")


def test_every_key_is_listed_for_the_reference():
    keys = {k for k, _, _ in C.all_keys()}
    assert {"encoder.epochs", "model.base_model", "search.objective", "resources.gpus_per_trial"} <= keys


def test_local_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray's workers run elsewhere than the driver's working directory: `raysd run` with the
    default relative run directory once failed in step 1, loading RUN/base from the wrong place."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sd").mkdir()
    cfg = C.load_config("demo", overrides={"run_dir": "runs/x", "dataset.name": "npz:data/d.npz",
                                         "model.base_model": "sd", "dataset.data_dir": "raw"})
    assert cfg.run_dir == str(tmp_path / "runs" / "x")
    assert cfg.dataset.name == f"npz:{tmp_path / 'data' / 'd.npz'}" and cfg.dataset.data_dir == str(tmp_path / "raw")
    assert cfg.model.base_model == str(tmp_path / "sd")
    hub = C.load_config("paper", overrides={"run_dir": "s3://bucket/run"})
    assert hub.model.base_model == "stabilityai/stable-diffusion-2-base" and hub.run_dir == "s3://bucket/run"
    assert C.load_config("demo").model.base_model == "builtin:tiny-digits"
