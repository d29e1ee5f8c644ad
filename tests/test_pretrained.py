"""The paper's weights: loaded from a file or the hub's cache, skipped in one line offline.

No test touches the network: a tiny ViT made here stands in for the paper's ViT-S/16, and
the download is replaced by what it does offline.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest
import timm
import torch

import dino_nb.model as models
from dino_nb.tools import pretrained as P

NAME = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny_weights(tmp_path: Path, **overrides: int) -> tuple[dict[str, torch.Tensor], Path]:
    """A randomly initialised tiny ViT backbone's state_dict, and the file it is saved in."""
    torch.manual_seed(0)
    state = models.build_backbone(NAME, **{**TINY, **overrides}).state_dict()
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    return state, path


def assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any attempt to reach the hub or to download."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network was used")

    real_build = models.build_backbone

    def build(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained and "pretrained_cfg_overlay" not in kwargs:
            refuse()
        return real_build(name, pretrained, **kwargs)

    monkeypatch.setattr(P, "reachable", refuse)
    monkeypatch.setattr(models, "build_backbone", build)


def test_loads_a_local_file_exactly(
    tmp_path: Path, no_network: None, capsys: pytest.CaptureFixture
) -> None:
    state, path = tiny_weights(tmp_path)
    model = P.load_paper_weights(NAME, file=path, **TINY)
    assert model is not None and not model.training
    assert_same_weights(model, state)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 32)  # (n_images, embed_dim): no head
    assert capsys.readouterr().out == ""


def test_a_file_of_another_model_fails_loudly(tmp_path: Path, no_network: None) -> None:
    _, path = tiny_weights(tmp_path, depth=1)  # one block fewer: blocks.1 would stay random
    with pytest.raises(RuntimeError, match="blocks.1"):
        P.load_paper_weights(NAME, file=path, **TINY)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        P.load_paper_weights(NAME, file=tmp_path / "missing.pth", **TINY)
    with pytest.raises(ValueError, match="unknown timm model"):
        P.load_paper_weights("vit_smal_patch16_224.dino")


def test_weights_in_the_hub_cache_need_no_network(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants
    from safetensors.torch import save_file

    state, _ = tiny_weights(tmp_path)
    # the layout huggingface_hub gives its cache: refs/main names the snapshot
    org, repo = timm.models.get_pretrained_cfg(NAME).hf_hub_id.split("/")
    cached = tmp_path / "hub" / f"models--{org}--{repo}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0" * 40)
    (cached / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(state, cached / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache is what offline mode is for

    model = P.load_paper_weights(NAME, **TINY)
    assert model is not None
    assert_same_weights(model, state)


def skipped(capsys: pytest.CaptureFixture, why: str, name: str = P.PAPER_WEIGHTS) -> None:
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"The paper's weights ({name}) are not available: {why}. Skipping this section."
    ]


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_offline_mode_is_one_line_and_none(
    empty_cache: None,
    no_network: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert P.load_paper_weights() is None
    skipped(capsys, "not in the local cache and HF_HUB_OFFLINE is set")


def test_no_network_is_one_line_and_none(
    empty_cache: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    asked = []
    monkeypatch.setattr(P, "reachable", lambda url, timeout: asked.append((url, timeout)))
    monkeypatch.setattr(models, "build_backbone", lambda *a, **k: pytest.fail("downloaded"))
    assert P.load_paper_weights(timeout=0.5) is None
    assert asked == [("https://huggingface.co", 0.5)]
    skipped(capsys, "huggingface.co cannot be reached (offline?)")


def test_a_failed_download_is_one_line_and_none(
    empty_cache: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def offline(name: str, pretrained: bool = False, **kwargs: object) -> None:
        assert pretrained and name == P.PAPER_WEIGHTS
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(P, "reachable", lambda url, timeout: True)
    monkeypatch.setattr(models, "build_backbone", offline)
    assert P.load_paper_weights() is None
    skipped(capsys, "the download failed (OSError)")


def test_download_off_reads_neither_network_nor_cache(
    no_network: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(P, "_cached_file", lambda hub_id: pytest.fail("cache read"))
    assert P.load_paper_weights(download=False) is None
    skipped(capsys, "downloads are off here (download=False)")


def test_reachable_needs_an_http_answer_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "*")  # straight to the local servers below
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    with server:
        threading.Thread(target=server.handle_request, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}"
        assert P.reachable(url, timeout=5.0)  # 501 (no do_HEAD) is an answer
    assert not P.reachable(url, timeout=5.0)  # closed: refused at once
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        start = time.perf_counter()
        assert not P.reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3)
        assert time.perf_counter() - start < 2.0
    assert not P.reachable("not a url", timeout=0.1)
