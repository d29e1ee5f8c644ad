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
from typing import Any

import torch

from .config import GROUPS, PRESETS, TrainConfig, preset
from .data import imagenette_available

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
        help="starting configuration (default auto: 'imagenette' on a GPU with ImageNette, "
        "'cpu-photos' on a CPU with photos, else 'cpu-quick'); see PRESETS in dino_nb/config.py",
    )
    p.add_argument(
        "--config", help="JSON file of TrainConfig fields, applied over the preset (options win)"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as JSON and exit",
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
        groups[f.metadata["group"]].add_argument(
            *flags, dest=f.name, help=help_text, **_option_kwargs(f)
        )
    return p


def _auto_preset(args: argparse.Namespace) -> str:
    """The preset ``--preset auto`` picks.

    * no ``--data`` (the main job): ``imagenette`` on a GPU when ImageNette is found, else
      ``cpu-quick`` (the built-in shapes in a 2-minute budget);
    * ``--data`` naming photos (``imagenette`` or a folder): ``imagenette`` on a GPU,
      ``cpu-photos`` on a CPU;
    * ``--data builtin``: ``cpu-quick``.
    """
    data = getattr(args, "data", None)
    on_gpu = torch.cuda.is_available() and getattr(args, "device", "auto") != "cpu"
    if data == "builtin":
        return "cpu-quick"
    if data is None:
        return "imagenette" if on_gpu and imagenette_available() else "cpu-quick"
    return "imagenette" if on_gpu else "cpu-photos"


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Parse the command line into a :class:`TrainConfig` (and whether to only print it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = _auto_preset(args) if args.preset == "auto" else args.preset
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
    return preset(name, **overrides), getattr(args, "print_config", False)
