"""The command lines of the package, generated from dataclasses by one generator.

:func:`add_options` turns every field of a dataclass into ``--field-name``: help text (and
``--help`` group) from the field's metadata, type from the annotation (``Literal``: choices,
``bool``: ``--x/--no-x``), required when it has no default. :class:`~dino_nb.config.TrainConfig`
gives ``python -m dino_nb.train`` its options, plus the tutorial's short options
(:data:`TUTORIAL_ALIASES`), ``-c/--n-crops`` (the tutorial counts all crops, the config the
local ones) and ``--preset``, ``--config``, ``--print-config``, ``--no-resume``. Each tool
declares an options dataclass with :func:`option` and runs through :func:`run_program`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

from ..config import TrainConfig
from ..loop import SCORE_NAMES, NonFiniteLossError, train
from ..sources import imagenette_available
from .presets import PRESETS, describe_preset, preset

#: The tutorial's option names for config fields: field -> extra option strings.
TUTORIAL_ALIASES: dict[str, tuple[str, ...]] = {
    "batch_size": ("-b",),
    "device": ("-d",),
    "eval_every": ("-l", "--logging-freq"),
    "epochs": ("-e", "--n-epochs"),
    "out_dim": ("-o",),
    "tensorboard_dir": ("-t",),
    "weight_decay": ("-w",),
}

#: Exceptions that mean bad input (a missing file, a wrong value): one line and exit code 2.
INPUT_ERRORS = (FileNotFoundError, ValueError, RuntimeError, KeyError, OSError)

#: Field metadata that is not an ``add_argument`` keyword.
_META = ("help", "group", "min", "one_of")

Options = TypeVar("Options")


def option(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A field of a tool's options dataclass: default (none: required) and help text.

    ``meta``: ``min`` (smaller values are refused), ``group`` (a ``--help`` section),
    ``one_of`` (exactly one of the options sharing the name must be given), and
    ``add_argument`` keywords (``metavar``, ``nargs``, ``const``) that override the annotation's.
    """
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _option_kwargs(name: str, hint: Any, low: float | None = None) -> dict[str, Any]:
    """``add_argument`` keywords for a field called ``name``, from its type annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = args[0] if union else hint  # X | None -> X
    if base is bool and len(args) > 1:  # bool | Literal["auto"]: --gpu-augment [auto|on|off]
        return {"type": _auto_bool, "nargs": "?", "const": True, "metavar": "auto|on|off"}
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is typing.Literal:
        return {"choices": list(typing.get_args(base))}
    if typing.get_origin(base) is tuple:  # tuple[int, ...]: --ks 10 20; tuple[float, float]
        item, *more = typing.get_args(base)
        if more == [Ellipsis]:
            return {"type": _at_least(item, low), "nargs": "+", "metavar": name.upper()}
        return {"type": item, "nargs": 1 + len(more), "metavar": ("LOW", "HIGH")}
    if typing.get_origin(base) is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if base is not hint:  # optional: "none" gives None (e.g. --minutes none: no time budget)
        return {"type": _or_none(_at_least(base, low)), "metavar": f"{name.upper()}|none"}
    return {"type": _at_least(base, low), "metavar": name.upper()}


def _at_least(convert: Callable[[str], Any], low: float | None) -> Any:
    """An argparse type: ``convert``, refusing values below ``low`` (``None``: no bound)."""
    if low is None:
        return convert

    def parse(text: str) -> Any:
        value = convert(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in its errors
    return parse


def _or_none(convert: Callable[[str], Any]) -> Any:
    """An argparse type: ``none`` (any case) is ``None``, anything else goes through ``convert``."""

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in its errors
    return parse


def _auto_bool(text: str) -> bool | str:
    """An argparse type: ``auto``, or on/off (true/false, yes/no, 1/0) as a bool."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"depth\": 6}}', got {text!r}"
        )
    return value


def _help_text(f: dataclasses.Field) -> str:
    """The field's help, and its default unless it is required or in an either-or group."""
    text = f.metadata["help"]
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = json.dumps(default) if isinstance(default, dict) else default
        text += "" if "one_of" in f.metadata else f" [default: {shown}]"
    return text.replace("%", "%%")


def add_options(
    parser: argparse.ArgumentParser,
    options: type,
    aliases: Mapping[str, tuple[str, ...]] | None = None,
) -> None:
    """Add an option to ``parser`` for each field of the dataclass ``options``.

    Options not given stay out of the namespace: ``options(**vars(namespace))`` takes the
    field's default, a preset keeps its value. ``aliases``: field -> extra option strings.
    """
    hints = typing.get_type_hints(options)
    sections: dict[str, Any] = {"": parser}  # --help section or either-or group -> its parser
    for f in dataclasses.fields(options):
        key = f.metadata.get("group", "")
        if key not in sections:
            sections[key] = parser.add_argument_group(key)
        if "one_of" in f.metadata:
            group, key = sections[key], "one_of " + f.metadata["one_of"]
            if key not in sections:
                sections[key] = group.add_mutually_exclusive_group(required=True)
        flag = "--" + f.name.replace("_", "-")
        kwargs = _option_kwargs(f.name, hints[f.name], f.metadata.get("min"))
        kwargs.update({k: v for k, v in f.metadata.items() if k not in _META})
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        names = (*(aliases or {}).get(f.name, ()), flag)
        add = sections[key].add_argument
        add(*names, dest=f.name, help=_help_text(f), default=argparse.SUPPRESS, **kwargs)
        if kwargs.get("type") is _auto_bool:  # the --no-X spelling of a plain bool keeps working
            no = {"action": "store_const", "const": False, "help": f"same as {flag} off"}
            add("--no-" + flag[2:], dest=f.name, default=argparse.SUPPRESS, **no)


def parse_options(
    parser: argparse.ArgumentParser, options: type[Options], argv: Sequence[str] | None
) -> Options:
    """``argv`` parsed by a parser from :func:`add_options`, as an ``options`` object."""
    given = vars(parser.parse_args(argv))  # nargs="+" gives lists, the fields say tuples
    return options(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def run_program(
    body: Callable[[Options], int],
    options: type[Options],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    errors: tuple[type[Exception], ...] = INPUT_ERRORS,
) -> int:
    """Parse ``argv`` into ``options`` and return ``body(options)``, the exit code.

    Bad options are argparse's usage and error (exit code 2). Bad input that ``body`` raises
    (``errors``) is one ``error: ...`` line on stderr and exit code 2, without a traceback.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, options)
    opts = parse_options(parser, options, argv)
    try:
        return body(opts)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The parser: run options, then one group per field group (data, model, ...)."""
    p = argparse.ArgumentParser(
        prog="python -m dino_nb.train",
        description="Train DINO (self-distillation with no labels) on ImageNette, your photos or the built-in shapes.",
        argument_default=argparse.SUPPRESS,  # only what is given overrides the preset
    )
    p.add_argument(
        "--preset",
        default="auto",
        choices=["auto", *PRESETS],
        help="starting configuration (default auto: on a GPU with photos 'imagenette', or 't4' on a "
        "card of 16 GB or less; 'cpu-photos' on a CPU with photos; else 'cpu-quick'); "
        "--print-config shows what a preset changes and why",
    )
    p.add_argument(
        "--config", help="JSON file of TrainConfig fields, applied over the preset (options win)"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print what the preset changes and why, and what the options change on top of it "
        "(on stderr), then the resolved configuration as JSON (on stdout), and exit",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start afresh even if --out holds a checkpoint"
    )
    p.add_argument(
        "-c",
        "--n-crops",
        type=int,
        help="crops per image, 2 global + the rest local (the tutorial's -c)",
    )
    add_options(p, TrainConfig, TUTORIAL_ALIASES)  # one --help section per field group
    return p


#: Cards with at most this much memory (GiB) get the ``t4`` preset (a T4 reports about 14.7
#: GiB, a P100 about 15.9; the ``imagenette`` preset's ViT-S/16 wants more).
SMALL_GPU_GIB = 16.5


def gpu_memory_gib() -> float:
    """Memory of CUDA device 0 in GiB (0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def auto_preset(data: str | None = None, device: str = "auto", notebook: bool = False) -> str:
    """The preset ``--preset auto`` picks, and the notebooks too: the one rule for both.

    ============================  ============  ==============
    what there is                 command line  notebooks
    ============================  ============  ==============
    no photos                     cpu-quick     cpu
    photos, no GPU                cpu-photos    cpu-photos-cls
    photos, a GPU of <= 16.5 GiB  t4            t4
    photos, a larger GPU          imagenette    imagenette
    ============================  ============  ==============

    Photos: ``--data imagenette`` or a folder; with no ``--data``, ImageNette when it is found
    and a GPU can use it (on a CPU the main job stays on the built-in shapes). The notebooks'
    variants: ``cpu`` runs a fixed 372 steps (the same numbers on every machine),
    ``cpu-photos-cls`` embeds with the [CLS] token (attention maps that mean something).

    Args:
        data: the ``--data`` value (``None``: not given).
        device: ``auto``, ``cpu`` or ``cuda``.
        notebook: the notebooks' variants of the CPU presets.
    """
    on_gpu = torch.cuda.is_available() and device != "cpu"
    photos = data != "builtin" if data is not None else on_gpu and imagenette_available()
    if not photos:
        return "cpu" if notebook else "cpu-quick"
    if not on_gpu:
        return "cpu-photos-cls" if notebook else "cpu-photos"
    return "t4" if gpu_memory_gib() <= SMALL_GPU_GIB else "imagenette"


class Command(NamedTuple):
    """What the command line asks for."""

    config: TrainConfig
    print_only: bool  # --print-config: describe the configuration and exit
    preset: str  # the preset it starts from (``auto`` resolved)


def config_from_args(argv: list[str] | None = None) -> Command:
    """Parse the command line into a :class:`TrainConfig`, whether to only print it, and its preset."""
    parser = build_parser()
    args = parser.parse_args(argv)
    auto = auto_preset(getattr(args, "data", None), getattr(args, "device", "auto"))
    name = auto if args.preset == "auto" else args.preset
    overrides: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            overrides.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"argument --config: cannot read {args.config}: {e}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides.update({k: v for k, v in vars(args).items() if k in names})
    if getattr(args, "n_crops", None) is not None:
        if args.n_crops < 2:
            parser.error(
                f"argument -c/--n-crops: must be at least 2 (the global crops), got {args.n_crops}"
            )
        overrides["n_local_crops"] = args.n_crops - 2
    if getattr(args, "no_resume", False):
        if "resume" in vars(args):
            parser.error("--resume and --no-resume contradict each other")
        overrides["resume"] = "never"
    return Command(preset(name, **overrides), getattr(args, "print_config", False), name)


def train_main(argv: list[str] | None = None) -> int:
    """``python -m dino_nb.train``: train, print a summary; errors become one line on stderr and exit code 2."""
    try:
        cfg, print_only, name = config_from_args(argv)
        if print_only:  # the why on stderr, so that stdout stays JSON (--config takes it back)
            print(describe_preset(name, cfg), file=sys.stderr)
            print(cfg.to_json())
            return 0
        result = train(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLossError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        first = result.knn_history[0][1] if result.knn_history else float("nan")
        last = result.knn_history[-1][1] if result.knn_history else float("nan")
        print(
            f"done: {result.steps} steps in {result.seconds:.0f} s; {SCORE_NAMES[result.score]} "
            f"{first:.1%} -> {last:.1%} (best {result.best_knn:.1%}); run folder {result.out_dir}"
        )
    return 143 if result.interrupted else 0
