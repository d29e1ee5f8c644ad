"""Command lines generated from dataclasses: TrainConfig's, a toy's, the tools'; nothing drifts."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
from dataclasses import dataclass
from typing import Literal

import pytest

from dino_nb.config import GROUPS, TrainConfig
from dino_nb.tools.cli import (
    TUTORIAL_ALIASES,
    add_options,
    build_parser,
    config_from_args,
    option,
    parse_options,
    run_program,
)
from dino_nb.tools.data import DataOptions
from dino_nb.tools.embed import EmbedOptions
from dino_nb.tools.evaluate import EvaluateOptions


def _non_default(f: dataclasses.Field) -> tuple[list[str], object]:
    """Command-line words that set field ``f`` to a value other than its default, and that value."""
    default = TrainConfig().to_dict()[f.name]
    flag = "--" + f.name.replace("_", "-")
    special = {
        "data": "builtin",
        "precision": "fp32",
        "device": "cpu",
        "resume": "never",
        "model": "vit_tiny_patch16_224",
        "model_kwargs": {"depth": 2},
        "global_crops_scale": (0.5, 0.9),
        "local_crops_scale": (0.1, 0.3),
        "blur_sigma": (0.05, 1.0),
        "teacher_centering": "sinkhorn",
        "koleo_weight": 0.1,
        "canvas_size": 300,
        "out": "runs/x",
        "tensorboard_dir": "tb",
    }
    if f.name in special:
        value = special[f.name]
    elif f.name == "gpu_augment":  # auto, on or off
        return [flag, "on"], True
    elif isinstance(default, bool):
        return ([flag] if not default else ["--no-" + flag[2:]]), not default
    elif f.name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer"):
        value = 0
    elif f.name in ("momentum_teacher", "momentum_teacher_end", "center_momentum"):
        value = 0.5
    elif f.name == "minutes":
        value = 2.5
    elif default is None or isinstance(default, int | float):
        value = (default or 0) + 3
    else:
        raise AssertionError(f"the test does not know how to set {f.name}: add it")
    if isinstance(value, dict):
        return [flag, json.dumps(value)], value
    if isinstance(value, tuple):
        return [flag, *map(str, value)], value
    return [flag, str(value)], value


@pytest.mark.parametrize("f", dataclasses.fields(TrainConfig), ids=lambda f: f.name)
def test_every_field_is_settable_from_the_command_line(f: dataclasses.Field) -> None:
    words, value = _non_default(f)
    cfg = config_from_args(["--preset", "imagenette", *words])[0]
    assert getattr(cfg, f.name) == value
    assert type(getattr(cfg, f.name)) is type(value)


def test_every_field_has_help_and_a_group() -> None:
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help") and f.metadata.get("group") in GROUPS, f.name
    text = build_parser().format_help()
    for group in GROUPS:
        assert f"\n{group}:" in text
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text


def test_tutorial_short_options() -> None:
    cfg = config_from_args(
        [
            "--preset",
            "imagenette",
            "-b",
            "16",
            "-d",
            "cpu",
            "-l",
            "50",
            "-e",
            "37",
            "-o",
            "512",
            "-t",
            "tb",
            "-w",
            "0.1",
            "-c",
            "6",
        ]
    )[0]
    assert (cfg.batch_size, cfg.device, cfg.eval_every, cfg.epochs, cfg.out_dim) == (
        16,
        "cpu",
        50,
        37,
        512,
    )
    assert (cfg.tensorboard_dir, cfg.weight_decay, cfg.n_local_crops) == ("tb", 0.1, 4)
    assert set(TUTORIAL_ALIASES) <= {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = config_from_args(["--preset", "imagenette", "--logging-freq", "9", "--n-epochs", "31"])[0]
    assert (cfg.eval_every, cfg.epochs) == (9, 31)


def test_only_given_options_override_the_preset() -> None:
    cfg = config_from_args(["--preset", "cpu"])[0]
    from dino_nb.tools.presets import preset

    assert cfg == preset("cpu")


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["-c", "1"], "at least 2"),
        (["--model-kwargs", "[1, 2]"], "JSON object"),
        (["--model-kwargs", "{depth"], "not valid JSON"),
        (["--precision", "fp8"], "invalid choice"),
        (["--resume", "x.pth", "--no-resume"], "contradict"),
    ],
)
def test_bad_options_are_one_clear_error(words, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        config_from_args(["--preset", "imagenette", *words])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_contradictory_values_are_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="warmup_epochs"):
        config_from_args(["--preset", "imagenette", "--epochs", "2", "--warmup-epochs", "5"])


def test_auto_preset_picks_by_data_and_device(tmp_path, monkeypatch) -> None:
    import dino_nb.tools.cli as cli

    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli, "imagenette_available", lambda: True)
    assert config_from_args([])[0].data == "builtin"  # the main job stays on the built-in shapes
    cfg = config_from_args(["--data", str(tmp_path)])[0]
    assert cfg.data == str(tmp_path) and cfg == preset_of("cpu-photos", data=str(tmp_path))
    assert config_from_args(["--data", "builtin"])[0] == preset_of("cpu-quick")
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "gpu_memory_gib", lambda: 80.0)  # an A100
    assert config_from_args([])[0] == preset_of("imagenette")
    assert config_from_args(["--data", str(tmp_path)])[0] == preset_of(
        "imagenette", data=str(tmp_path)
    )
    assert (
        config_from_args(["--data", str(tmp_path), "-d", "cpu"])[0].model
        == preset_of("cpu-photos").model
    )
    monkeypatch.setattr(cli, "gpu_memory_gib", lambda: 14.7)  # a Kaggle or Colab T4
    assert config_from_args([])[0] == preset_of("t4")
    assert cli.auto_preset("imagenette", "cuda") == "t4"  # the notebooks' choice is the same
    assert cli.auto_preset("imagenette", "cuda", notebook=True) == "t4"
    # the notebooks' variants of the CPU presets: a fixed step count, the [CLS] embedding
    assert cli.auto_preset("builtin", "cuda", notebook=True) == "cpu"
    assert cli.auto_preset("imagenette", "cpu", notebook=True) == "cpu-photos-cls"
    assert cli.auto_preset("imagenette", "cpu") == "cpu-photos"
    monkeypatch.setattr(cli, "imagenette_available", lambda: False)
    assert config_from_args([])[0] == preset_of("cpu-quick")
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    main_job = config_from_args([])[0]  # on a CPU: the built-in shapes in a 2-minute budget
    assert main_job == preset_of("cpu-quick") and main_job.minutes == 2.0


def preset_of(name, **overrides):
    from dino_nb.tools.presets import preset

    return preset(name, **overrides)


def test_gpu_augment_takes_auto_on_off_and_the_no_spelling() -> None:
    def value(*words):
        return config_from_args(["--preset", "imagenette", *words])[0].gpu_augment

    assert value() == "auto"
    assert value("--gpu-augment") is True
    assert value("--gpu-augment", "off") is False
    assert value("--no-gpu-augment") is False
    assert value("--gpu-augment", "auto") == "auto"
    with pytest.raises(SystemExit):
        value("--gpu-augment", "maybe")


def test_optional_fields_take_none() -> None:
    cfg = config_from_args(["--preset", "cpu", "--minutes", "none", "--max-steps", "None"])[0]
    assert cfg.minutes is None and cfg.max_steps is None
    assert config_from_args(["--preset", "cpu-photos"])[0].minutes == 15.0
    with pytest.raises(SystemExit):
        config_from_args(["--preset", "cpu", "--minutes", "soon"])


# --------------------------------------------------------------------------- the generator


@dataclass(kw_only=True)
class Toy:
    name: str = option(help="a required name")
    mode: Literal["fast", "exact"] = option("fast", "how to run")
    count: int = option(3, "how many", min=1)
    ks: tuple[int, ...] = option((10, 20), "neighbour counts", min=1)
    cache: bool = option(False, "keep a cache")
    figures: bool = option(True, "draw the figures")
    out: str | None = option(None, "a folder")


@dataclass(kw_only=True)
class Either:
    find: str | None = option(None, "find it", one_of="action", nargs="?", const="")
    download: str | None = option(None, "download it", one_of="action")


def parse(options: type, *words: str) -> object:
    parser = argparse.ArgumentParser(prog="toy")
    add_options(parser, options)
    return parse_options(parser, options, list(words))


def refused(capsys, options: type, *words: str) -> str:
    """The one error line argparse prints (after its usage) for ``words``."""
    with pytest.raises(SystemExit) as e:
        parse(options, *words)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("usage: toy") and lines[-1].startswith("toy: error: ")
    return lines[-1]


def test_generator_defaults_come_from_the_dataclass() -> None:
    assert parse(Toy, "--name", "x") == Toy(name="x")
    opts = parse(Toy, "--name", "x", "--mode", "exact", "--count", "1", "--ks", "5", "7")
    assert (opts.mode, opts.count, opts.ks) == ("exact", 1, (5, 7))
    assert parse(Toy, "--name", "x", "--out", "none").out is None


def test_generator_a_missing_required_option_is_named(capsys) -> None:
    assert "--name" in refused(capsys, Toy) and "required" in refused(capsys, Toy, "--count", "2")


def test_generator_literal_gives_choices(capsys) -> None:
    assert "invalid choice: 'slow'" in refused(capsys, Toy, "--name", "x", "--mode", "slow")
    parser = argparse.ArgumentParser()
    add_options(parser, Toy)
    assert "--mode {fast,exact}" in parser.format_help()


@pytest.mark.parametrize(
    ("words", "option_name"), [(["--count", "0"], "--count"), (["--ks", "3", "0"], "--ks")]
)
def test_generator_min_is_one_error_naming_the_option(capsys, words, option_name) -> None:
    line = refused(capsys, Toy, "--name", "x", *words)
    assert line == f"toy: error: argument {option_name}: must be >= 1, got 0"


def test_generator_bool_fields_take_the_flag_and_its_no_spelling() -> None:
    assert parse(Toy, "--name", "x", "--cache").cache is True
    assert parse(Toy, "--name", "x", "--no-cache").cache is False
    assert parse(Toy, "--name", "x", "--no-figures").figures is False
    assert parse(Toy, "--name", "x").figures is True


def test_generator_one_of_needs_exactly_one(capsys) -> None:
    assert parse(Either, "--find").find == ""
    assert parse(Either, "--download", "320px").download == "320px"
    assert "one of the arguments --find --download is required" in refused(capsys, Either)
    assert "not allowed with" in refused(capsys, Either, "--find", "--download", "x")


def test_generator_help_lists_every_field_with_its_default() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, Toy)
    text = " ".join(parser.format_help().split())
    for f in dataclasses.fields(Toy):
        assert "--" + f.name in text
    assert "how many [default: 3]" in text and "a required name [default" not in text


def test_run_program_turns_input_errors_into_one_line_and_exit_code_2(capsys) -> None:
    def body(opts: Toy) -> int:
        if opts.count > 5:
            raise ValueError(f"count {opts.count} is too many for {opts.name}")
        print(f"hello {opts.name} x{opts.count}")
        return 0

    run = functools.partial(run_program, body, Toy, prog="toy", description="a toy")
    assert run(["--name", "ada"]) == 0
    assert capsys.readouterr().out == "hello ada x3\n"
    assert run(["--name", "ada", "--count", "9"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: count 9 is too many for ada\n" and captured.out == ""


def test_run_program_lets_bugs_keep_their_traceback() -> None:
    def body(opts: Toy) -> int:
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        run_program(body, Toy, ["--name", "x"], prog="toy", description="a toy")


# --------------------------------------------------------------------------- the tools


TOOLS = {"evaluate": EvaluateOptions, "embed": EmbedOptions, "data": DataOptions}


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_option_is_in_its_help(tool, capsys) -> None:
    module = importlib.import_module(f"dino_nb.tools.{tool}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m dino_nb.{tool}" in text
    for f in dataclasses.fields(TOOLS[tool]):
        assert "--" + f.name.replace("_", "-") in text


def test_tools_keep_their_flag_spellings() -> None:
    words = "--checkpoint c.pth --ks 10 20 --cache --no-figures".split()
    assert parse(EvaluateOptions, *words) == EvaluateOptions(
        checkpoint="c.pth", ks=(10, 20), cache=True, figures=False
    )
    words = "--checkpoint c --data d --out o --no-normalize --no-progress --which student".split()
    assert parse(EmbedOptions, *words) == EmbedOptions(
        checkpoint="c", data="d", out="o", normalize=False, progress=False, which="student"
    )
    assert parse(DataOptions, "--find") == DataOptions(find="")
    words = "--download 160px --root r --keep-archive".split()
    assert parse(DataOptions, *words) == DataOptions(download="160px", root="r", keep_archive=True)
