"""The command line of ``python -m dino_nb.train``, generated from :class:`~dino_nb.config.TrainConfig`.

Every field becomes ``--field-name`` (help text and ``--help`` group from the field's
metadata, type from its annotation), so the parser and the dataclass cannot drift apart.
On top: the tutorial's short options (:data:`TUTORIAL_ALIASES`), ``-c/--n-crops`` (the
tutorial counts all crops, the config counts local ones), and the options that are not
settings (``--preset``, ``--config``, ``--print-config``, ``--no-resume``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .config import GROUPS, TrainConfig
from .presets import PRESETS, preset
from .sources import imagenette_available

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

_HINTS = typing.get_type_hints(TrainConfig)


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


def _option_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    """``add_argument`` keywords for one field, from its type annotation."""
    hint = _HINTS[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = (
        args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    )  # X | None -> X
    if base is bool and len(args) > 1:  # bool | Literal["auto"]: --gpu-augment [auto|on|off]
        return {"type": _auto_bool, "nargs": "?", "const": True, "metavar": "auto|on|off"}
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is typing.Literal:
        return {"choices": list(typing.get_args(base))}
    if typing.get_origin(base) is tuple:
        return {"type": float, "nargs": 2, "metavar": ("LOW", "HIGH")}
    if typing.get_origin(base) is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if base is not hint:  # optional: "none" gives None (e.g. --minutes none: no time budget)
        return {"type": _or_none(base), "metavar": f"{f.name.upper()}|none"}
    return {"type": base, "metavar": f.name.upper()}


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


def _or_none(convert: type) -> Any:
    """An argparse type: ``none`` (any case) is ``None``, anything else goes through ``convert``."""

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__  # argparse names the type in its error message
    return parse


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
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        flags = (*TUTORIAL_ALIASES.get(f.name, ()), "--" + f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = json.dumps(default) if isinstance(default, dict) else default
        help_text = f"{f.metadata['help']} [default: {shown}]".replace("%", "%%")
        group = groups[f.metadata["group"]]
        kwargs = _option_kwargs(f)
        group.add_argument(*flags, dest=f.name, help=help_text, **kwargs)
        if kwargs.get("type") is _auto_bool:  # the --no-X spelling of a plain bool keeps working
            group.add_argument(
                "--no-" + f.name.replace("_", "-"),
                dest=f.name,
                action="store_const",
                const=False,
                help=f"same as --{f.name.replace('_', '-')} off",
            )
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
