"""Pins the training defaults: the paper, the tutorial and ImageNette disagree, so each is deliberate."""

import dataclasses
import json
import typing

import pytest

from dino_nb.config import Centering, TrainConfig
from dino_nb.tools.presets import PRESETS, describe_preset, preset, preset_changes

# Changing a default is a decision: update this table in the same commit, with the reason
# in the field's comment in dino_nb/config.py.
EXPECTED_DEFAULTS = {
    # data
    "data": "imagenette",
    "strict_data": False,
    "global_size": 224,  # paper
    "local_size": 96,  # paper (tutorial: 224)
    "n_local_crops": 8,  # paper
    "global_crops_scale": (0.4, 1.0),  # paper
    "local_crops_scale": (0.05, 0.4),  # paper
    "blur_sigma": (0.1, 2.0),  # paper (BYOL's), for 224-pixel crops
    "gpu_augment": "auto",  # on where the loader workers cannot feed the GPU; off on the CPU
    "cache_pixels": False,
    "canvas_size": None,  # global size x 256/224
    "num_workers": None,
    # model
    "model": "vit_small_patch16_224",  # paper's ViT-S/16
    "model_kwargs": {},
    "pretrained": False,
    "drop_path_rate": 0.1,  # paper
    "out_dim": 65536,  # paper (tutorial: 1024)
    "hidden_dim": 2048,  # paper (tutorial: 512)
    "bottleneck_dim": 256,
    "head_layers": 3,
    "norm_last_layer": True,  # paper (tutorial: False)
    "use_bn_in_head": False,  # official default
    # optimisation
    "batch_size": 64,
    "epochs": 100,
    "minutes": None,
    "max_steps": None,
    "base_lr": 5e-4,  # paper, scaled by global batch / 256
    "min_lr": 1e-6,
    "warmup_epochs": 10,
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "momentum_teacher": 0.996,  # paper (tutorial: 0.9995 constant)
    "momentum_teacher_end": 1.0,
    "warmup_teacher_temp": 0.04,
    "teacher_temp": 0.07,
    "warmup_teacher_temp_epochs": 30,
    "student_temp": 0.1,
    "center_momentum": 0.9,
    "teacher_centering": "center",  # paper (DINOv2: Sinkhorn-Knopp)
    "koleo_weight": 0.0,  # paper (DINOv2: 0.1)
    "clip_grad": 3.0,  # paper (tutorial: 2.0)
    "freeze_last_layer": 1,
    "precision": "auto",
    "compile": False,
    "device": "auto",
    "seed": 0,
    # evaluation, logging, checkpoints
    "eval_every": 1000,
    "eval_train_subset": 5000,
    "batch_size_eval": 128,
    "knn_k": 20,  # paper
    "knn_temperature": 0.07,  # paper
    "projector_size": 200,
    "log_every": 10,
    "save_every": 1000,
    "out": None,
    "tensorboard_dir": None,
    "resume": "auto",
    "progress": True,
}


def test_defaults_are_pinned():
    actual = TrainConfig().to_dict()
    assert set(actual) == set(EXPECTED_DEFAULTS), (
        f"new fields {sorted(set(actual) - set(EXPECTED_DEFAULTS))}, "
        f"removed fields {sorted(set(EXPECTED_DEFAULTS) - set(actual))}: pin them here"
    )
    for name, expected in EXPECTED_DEFAULTS.items():
        value = actual[name]
        assert value == expected and type(value) is type(expected), (name, value, expected)
    assert TrainConfig().n_crops == 10


def test_mutable_defaults_are_not_shared():
    a, b = TrainConfig(), TrainConfig()
    a.model_kwargs["depth"] = 2
    assert b.model_kwargs == {}


def test_preset_keys_are_fields():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"cpu", "imagenette"} <= set(PRESETS)
    for name, overrides in PRESETS.items():
        assert set(overrides) <= names, (name, set(overrides) - names)
    assert PRESETS["imagenette"] == {}
    assert preset("imagenette") == TrainConfig()


def test_cpu_preset():
    cfg = preset("cpu")
    for key, value in PRESETS["cpu"].items():
        assert getattr(cfg, key) == value, key
    expected_keys = {
        "data", "model", "model_kwargs", "global_size", "local_size", "n_local_crops", "out_dim",
        "hidden_dim", "batch_size", "epochs", "warmup_epochs", "warmup_teacher_temp_epochs",
    }  # fmt: skip
    assert expected_keys <= set(PRESETS["cpu"])
    assert cfg.data == "builtin" and cfg.model == "vit_tiny_patch16_224"
    assert cfg.warmup_epochs <= cfg.epochs and cfg.warmup_teacher_temp_epochs <= cfg.epochs
    assert (
        cfg.global_size % cfg.model_kwargs["patch_size"] == 0
        and cfg.local_size % cfg.model_kwargs["patch_size"] == 0
    )
    assert isinstance(cfg.local_crops_scale, tuple)


def test_preset_overrides():
    cfg = preset("cpu", epochs=3, seed=3)
    assert cfg.epochs == 3 and cfg.seed == 3 and cfg.data == "builtin"
    with pytest.raises(ValueError, match="bogus"):
        preset("cpu", bogus=1)


def test_preset_refuses_contradictions_early():
    with pytest.raises(ValueError, match=r"warmup_epochs \(2\) must be between 0 and epochs \(1\)"):
        preset("cpu", epochs=1)
    with pytest.raises(ValueError, match="minutes must be a positive number"):
        preset("cpu", minutes=0)
    with pytest.raises(ValueError, match="blur_sigma must be 0 < low <= high"):
        preset("cpu", blur_sigma=(1.0, 0.5))
    with pytest.raises(
        ValueError, match=r"teacher_centering must be one of \('center', 'sinkhorn'\)"
    ):
        preset("cpu", teacher_centering="softmax")
    with pytest.raises(ValueError, match=r"koleo_weight must be >= 0 \(0 turns it off\), got -0.1"):
        preset("cpu", koleo_weight=-0.1)
    with pytest.raises(ValueError, match=r"canvas_size \(40\) must be at least global_size \(48\)"):
        preset("cpu", canvas_size=40)


def test_centering_choices_match_the_loss():
    from dino_nb.loss import CENTERINGS

    assert typing.get_args(Centering) == CENTERINGS


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="nope"):
        preset("nope")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_changes_are_the_fields_off_the_defaults_each_with_a_reason(name):
    cfg, defaults = preset(name), TrainConfig()
    differ = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(cfg, f.name) != getattr(defaults, f.name)
    }
    changes = preset_changes(name)
    assert {c.field for c in changes} == differ and len(changes) == len(differ)
    for c in changes:
        assert c.default == getattr(defaults, c.field) and c.value == getattr(cfg, c.field)
        assert c.reason.strip(), (name, c.field)
    table = describe_preset(name)
    for c in changes:  # every changed field and the start of its reason are in the table
        assert c.field in table and c.reason.split()[0] in table


def test_describe_preset_lists_changes_with_reasons_and_a_run_s_own():
    text = describe_preset("cpu")
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("field"))
    assert head.split() == ["field", "default", "->", "preset", "why"]
    row = next(line for line in lines if line.startswith("base_lr "))
    assert row.split()[:4] == ["base_lr", "0.0005", "->", "0.005"] and "short run" in row
    row = next(line for line in lines if line.startswith("model_kwargs.depth "))
    assert row.split()[:4] == ["model_kwargs.depth", "-", "->", "4"]
    assert "on top of the preset" not in text
    assert "no changes" in describe_preset("imagenette")
    own = describe_preset("cpu", preset("cpu", eval_every=93))
    assert own.splitlines()[: len(lines)] == lines
    tail = own.splitlines()[len(lines) :]
    assert tail[0] == "on top of the preset:" and tail[-1].split() == [
        "eval_every",
        "100",
        "->",
        "93",
    ]
    assert describe_preset("cpu", preset("cpu")).endswith("nothing on top of the preset")


def test_unknown_preset_names_the_choices():
    for call in (preset_changes, describe_preset, preset):
        with pytest.raises(
            ValueError, match=r"unknown preset 'nope'; choose one of \[.*'cpu-photos-cls'"
        ):
            call("nope")


def test_cpu_photos_cls_is_cpu_photos_with_the_cls_token():
    photos, cls = preset("cpu-photos").to_dict(), preset("cpu-photos-cls").to_dict()
    assert {k for k in photos if photos[k] != cls[k]} == {"model_kwargs"}
    assert cls["model_kwargs"] == {**photos["model_kwargs"], "global_pool": "token"}
    assert photos["model_kwargs"]["global_pool"] == "avg"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip(name):
    cfg = preset(name, model_kwargs={"depth": 2}, out="runs/x")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # through JSON, tuples come back as lists and are turned back into tuples
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert isinstance(again.global_crops_scale, tuple) and isinstance(
        again.local_crops_scale, tuple
    )


def test_from_dict_missing_keys_take_defaults_and_unknown_keys_raise():
    assert TrainConfig.from_dict({"epochs": 3}) == dataclasses.replace(TrainConfig(), epochs=3)
    with pytest.raises(ValueError, match="not_a_field"):
        TrainConfig.from_dict({"epochs": 3, "not_a_field": 1})


def test_cpu_photos_preset_pinned():
    cfg = preset("cpu-photos")
    expected = {
        "minutes": 15.0,
        "cache_pixels": True,
        "global_size": 48,
        "local_size": 24,
        "n_local_crops": 4,
        "out_dim": 256,
        "batch_size": 32,
        "teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 0,
        "momentum_teacher": 0.98,
        "momentum_teacher_end": 0.98,
        "norm_last_layer": False,
        "use_bn_in_head": True,
        "koleo_weight": 0.1,  # DINOv2's
    }
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.model_kwargs["global_pool"] == "avg"
    assert cfg.model_kwargs["depth"] == 3 and cfg.model_kwargs["embed_dim"] == 128
    # the paper's blur range, scaled from its 224-pixel crops to the recipe's
    assert cfg.blur_sigma == pytest.approx((0.1 * 48 / 224, 2.0 * 48 / 224))
    assert cfg.model_kwargs["img_size"] == cfg.global_size
    assert cfg.global_size % cfg.model_kwargs["patch_size"] == 0
    assert cfg.local_size % cfg.model_kwargs["patch_size"] == 0
    assert cfg.warmup_epochs / cfg.epochs == pytest.approx(0.1)


def test_cpu_quick_preset_is_the_cpu_recipe_in_a_budget():
    quick, cpu = preset("cpu-quick"), preset("cpu")
    assert quick.minutes == 2.0 and cpu.minutes is None  # the notebooks' recipe has fixed steps
    assert quick.use_bn_in_head and not cpu.use_bn_in_head
    assert quick.model_kwargs == {**cpu.model_kwargs, "depth": 3}  # the [CLS] token, 3 blocks
    changed = {
        f.name for f in dataclasses.fields(quick) if getattr(quick, f.name) != getattr(cpu, f.name)
    }
    assert changed == {"minutes", "use_bn_in_head", "model_kwargs"}


def test_presets_are_not_shared_between_runs():
    a = preset("cpu")
    a.model_kwargs["depth"] = 99
    assert preset("cpu").model_kwargs["depth"] == 4
    assert preset("cpu-photos").model_kwargs["depth"] == 3


def test_describe_preset_lists_a_field_kept_at_the_default_on_purpose():
    """The cpu preset keeps the paper's blur in pixels: not a change, yet listed with its reason."""
    assert preset("cpu").blur_sigma == TrainConfig().blur_sigma
    assert "blur_sigma" not in {c.field for c in preset_changes("cpu")}
    row = next(
        line for line in describe_preset("cpu").splitlines() if line.startswith("blur_sigma")
    )
    assert row.split()[:6] == ["blur_sigma", "(0.1,", "2)", "->", "(0.1,", "2)"]
    assert "kept: the paper's blur in pixels" in row
