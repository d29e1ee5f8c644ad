"""The paper's own weights: DINO's ViT-S/16, as timm publishes it, when it can be had.

Caron et al. trained ViT-S/16 with DINO on ImageNet, without labels, and released the
weights; timm serves them as ``vit_small_patch16_224.dino`` from the Hugging Face hub.
Notebook 05 shows them beside its own small run. They are an option to look at, not a
baseline to beat: ImageNet contains ImageNette's ten classes.

Without a network, ``timm.create_model(..., pretrained=True)`` retries for about 50 s
before it fails. :func:`load_paper_weights` looks first, in order, at a local file, the
hub's cache, ``HF_HUB_OFFLINE``, and whether the hub answers within a few seconds; only
then does timm download. Whatever fails, it prints one line and returns ``None``, so an
optional section of a notebook skips itself at once.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from torch import nn

#: timm's name for the paper's ViT-S/16 (``dino_deitsmall16_pretrain.pth``), no classifier.
PAPER_WEIGHTS = "vit_small_patch16_224.dino"
#: The files a timm repository on the hub holds its weights in, preferred first.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether an HTTP server answers a ``HEAD`` request to ``url`` within ``timeout`` seconds.

    Any status counts as an answer (a 404 too); no answer, a refused or reset connection,
    a failed name lookup or a TLS error count as unreachable. An open TCP port is not
    enough: some sandboxes accept every connection and then say nothing. The request runs
    in a daemon thread that is given up on after ``timeout`` seconds, since the name
    lookup cannot be timed out. Proxies from the environment are used, as downloads do.

    Args:
        url: e.g. ``"https://huggingface.co"``.
        timeout: seconds to wait at most.
    """
    answered: list[bool] = []

    def ask() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            urllib.request.urlopen(request, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:  # a status code is an answer
            answered.append(True)
        except (OSError, ValueError):  # no answer; ValueError: not a URL
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, now or at hub import."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(
        (f or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags
    )


def _cached_file(hub_id: str | None) -> str | None:
    """The weights of a hub repository already in the local cache, or ``None``."""
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_FILES:
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):  # None: unknown; a sentinel object: known to be missing
            return path
    return None


def _skip(name: str, why: str) -> None:
    print(f"The paper's weights ({name}) are not available: {why}. Skipping this section.")


def load_paper_weights(
    name: str = PAPER_WEIGHTS,
    file: str | os.PathLike | None = None,
    *,
    download: bool = True,
    timeout: float = 3.0,
    **timm_kwargs: Any,
) -> nn.Module | None:
    """The backbone with published pretrained weights (DINO's by default), or ``None``.

    Where the weights come from, in order: ``file``; the Hugging Face cache (no network);
    a download by timm, tried only when ``download`` is on, ``HF_HUB_OFFLINE`` is not set
    and the hub answers within ``timeout`` seconds. When none of these gives the weights,
    one line says why and ``None`` comes back: the caller skips what needed them.

    Args:
        name: a timm name with a pretrained tag; ``vit_small_patch16_224.dino`` is the
            paper's ViT-S/16 (224 x 224 inputs in 16-pixel patches, 6 heads, 384 features).
        file: weights already on disk (a ``state_dict`` as ``.pth``/``.bin`` or
            ``.safetensors``, timm's or the official ``dino_deitsmall16_pretrain.pth``),
            loaded through timm's ``pretrained_cfg_overlay=dict(file=...)``.
        download: ``False`` never touches the network nor the hub's cache (only ``file``
            counts): the notebooks' test profile, whose output must be the same everywhere.
        timeout: seconds the hub gets to answer before the machine counts as offline.
        **timm_kwargs: passed on to :func:`~dino_nb.model.build_backbone` (``img_size``, ...).

    Returns:
        the backbone (``num_classes=0``: ``model(x)`` is ``(n_images, num_features)``) in
        eval mode on the CPU, or ``None``.

    Raises:
        ValueError: a name timm does not know.
        FileNotFoundError: ``file`` does not exist.
        RuntimeError: ``file`` does not fit the model (see the message).

    Examples:
        >>> paper = load_paper_weights()  # doctest: +SKIP
        >>> paper(torch.zeros(1, 3, 224, 224)).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """
    import timm

    from ..model import build_backbone

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; the paper's ViT-S/16 is {PAPER_WEIGHTS!r}")
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        return _from_file(name, path, **timm_kwargs)
    if not download:
        _skip(name, "downloads are off here (download=False)")
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    cached = _cached_file(hub_id)
    if cached is not None:
        return _from_file(name, Path(cached), **timm_kwargs)
    why = _why_not_download(hub_id, getattr(cfg, "url", None), timeout)
    if why is None:
        try:
            return build_backbone(name, pretrained=True, **timm_kwargs).eval()
        except Exception as err:  # noqa: BLE001 - hub, network and file errors of many kinds
            why = f"the download failed ({type(err).__name__})"
    _skip(name, why)
    return None


def _why_not_download(hub_id: str | None, url: str | None, timeout: float) -> str | None:
    """Why a download cannot work here (offline mode, no answer), or ``None`` to try it."""
    from huggingface_hub import constants

    if hub_id and _offline():
        return "not in the local cache and HF_HUB_OFFLINE is set"
    source = constants.ENDPOINT if hub_id else url or ""
    if not reachable(source, timeout):
        host = urllib.parse.urlsplit(source).hostname or "the weights' host"
        return f"{host} cannot be reached (offline?)"
    return None


def _from_file(name: str, path: Path, **timm_kwargs: Any) -> nn.Module:
    """Load weights from a file through timm (its filter adapts the official checkpoint).

    ``num_classes=0`` in the overlay says the file holds a backbone without classifier,
    as the paper's does; timm then loads it strictly, so a file of another model fails
    loudly instead of leaving some layers at random. ``custom_load=False``: the file is a
    PyTorch state_dict, not the npz that some default tags (``vit_tiny_patch16_224``) name;
    later timm assumes so for a file, timm 1.0.3 does not.
    """
    from ..model import build_backbone

    overlay = {"file": str(path), "num_classes": 0, "custom_load": False}
    backbone = build_backbone(name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
    return backbone.eval()
