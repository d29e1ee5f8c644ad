import json
import math
import sys

import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch.utils.data import DataLoader, TensorDataset

from dino_nb.checkpoint import save_atomic
from dino_nb.evaluation import (
    autocast_dtype,
    extract_features,
    inference,
    linear_probe,
    nearest_neighbours,
    sklearn_knn_topk,
    weighted_knn,
    weighted_knn_votes,
)
from dino_nb.tools.evaluate import cached_features, knn_sweep, main


def separable(n_per_class=20, n_classes=4, dim=16, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * 3
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def weighted_knn_oracle(train_f, train_y, test_f, test_y, k, temperature, num_classes):
    """Plain double loop over the paper's formula."""
    top1 = top5 = 0
    for i in range(len(test_f)):
        q = test_f[i]
        sims = []
        for j in range(len(train_f)):
            t = train_f[j]
            cos = float(q @ t) / (float(q.norm()) * float(t.norm()))
            sims.append((cos, j))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for cos, j in sims[:k]:
            votes[int(train_y[j])] += math.exp(cos / temperature)
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        top1 += ranked[0] == int(test_y[i])
        top5 += int(test_y[i]) in ranked[:5]
    return top1 / len(test_f), top5 / len(test_f)


def test_weighted_knn_hand_worked_example():
    # train: class 0 along x, class 1 along y; query at 30 degrees from x
    train_f = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    train_y = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]])
    # k=1: nearest is [1, 0] or [2, 0.1] -> class 0
    assert weighted_knn(train_f, train_y, q, torch.tensor([0]), k=1) == (1.0, 1.0)
    # k=4, T=1: votes class0 = e^cos(30) + e^cos(30-2.86), class1 = e^cos(60) + e^cos(60-1.9)
    votes = weighted_knn_votes(train_f, train_y, q, k=4, temperature=1.0)
    a0 = math.atan2(0.1, 2.0)
    a1 = math.atan2(3.0, 0.1)
    expected0 = math.exp(math.cos(math.pi / 6)) + math.exp(math.cos(math.pi / 6 - a0))
    expected1 = math.exp(math.cos(math.pi / 3)) + math.exp(math.cos(a1 - math.pi / 6))
    assert votes.shape == (1, 2)
    assert votes[0, 0].item() == pytest.approx(expected0, rel=1e-5)
    assert votes[0, 1].item() == pytest.approx(expected1, rel=1e-5)


def test_weighted_knn_matches_double_loop_oracle():
    g = torch.Generator().manual_seed(3)
    train_f, train_y = torch.randn(30, 5, generator=g), torch.randint(0, 7, (30,), generator=g)
    test_f, test_y = torch.randn(12, 5, generator=g), torch.randint(0, 7, (12,), generator=g)
    for k in (1, 5, 20, 100):
        got = weighted_knn(
            train_f, train_y, test_f, test_y, k=k, temperature=0.1, num_classes=7, chunk_size=5
        )
        want = weighted_knn_oracle(train_f, train_y, test_f, test_y, min(k, 30), 0.1, 7)
        assert got == pytest.approx(want)


def test_nearest_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sims, idx = nearest_neighbours(train, torch.tensor([[2.0, 0.1]]), k=2)
    assert idx.tolist() == [[0, 2]]
    assert sims[0, 0] == pytest.approx(2 / math.hypot(2, 0.1))
    assert nearest_neighbours(train, torch.ones(1, 2), k=10)[1].shape == (1, 3)


def test_knn_sweep_and_probe_on_separable_features():
    train_f, train_y = separable(seed=0)
    val_f, val_y = separable(n_per_class=5, seed=0)  # same centres (same seed) -> separable
    res = knn_sweep(train_f, train_y, val_f, val_y, ks=(10, 20, 100, 200))
    assert set(res) == {
        f"{m}_k{k}_top{t}"
        for m in ("sklearn", "weighted")
        for k in (10, 20, 100, 200)
        for t in (1, 5)
    }
    for k in (10, 20):
        assert res[f"weighted_k{k}_top1"] == 1.0
        assert res[f"sklearn_k{k}_top1"] == 1.0
    assert all(0.0 <= v <= 1.0 for v in res.values())
    # 4 classes: top-5 always contains the truth
    assert res["weighted_k200_top5"] == 1.0 and res["sklearn_k200_top5"] == 1.0
    # k=200 > 80 training samples: uniform sklearn votes are all classes tied
    assert res["sklearn_k200_top1"] == pytest.approx(0.25)
    assert linear_probe(train_f, train_y, val_f, val_y) == 1.0
    # sklearn_knn_topk's top-1 is the tutorial's classifier: sklearn's predict, scored directly
    # (k=80: every class tied, where the smallest label must win as in predict)
    for k in (5, 80):
        tutorial = KNeighborsClassifier(n_neighbors=k).fit(train_f.numpy(), train_y.numpy())
        expected = float((tutorial.predict(val_f.numpy()) == val_y.numpy()).mean())
        assert sklearn_knn_topk(train_f, train_y, val_f, val_y, k=k)[0] == expected


def test_probe_and_knn_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = torch.randint(0, 10, (200,), generator=g)
    res = knn_sweep(x[:150], y[:150], x[150:], y[150:], ks=(10,))
    assert res["weighted_k10_top1"] < 0.4
    assert linear_probe(x[:150], y[:150], x[150:], y[150:]) < 0.4


def test_bad_inputs():
    x, y = separable()
    with pytest.raises(ValueError, match="labels"):
        knn_sweep(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="ks"):
        knn_sweep(x, y, x, y, ks=(0,))
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(x, torch.zeros_like(y), x, y)
    with pytest.raises(ValueError):
        weighted_knn(x[:0], y[:0], x, y)


class Linear2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 4 * 4, 5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x.flatten(1))


def test_extract_features_and_cache(tmp_path):
    torch.manual_seed(0)
    model = Linear2().train()
    ds = TensorDataset(torch.randn(10, 3, 4, 4), torch.arange(10) % 3)
    loader = DataLoader(ds, batch_size=4)
    f, y = extract_features(model, loader)
    assert (
        f.shape == (10, 5)
        and f.dtype == torch.float32
        and y.tolist() == (torch.arange(10) % 3).tolist()
    )
    assert model.training  # mode restored
    assert torch.allclose(f, model.lin(ds.tensors[0].flatten(1)).detach())

    path = tmp_path / "feats.pt"
    with pytest.raises(ValueError, match="cache_key"):
        cached_features(model, loader, path, "")
    f1, _ = cached_features(model, loader, path, "step1")
    calls = model.calls
    f2, _ = cached_features(model, loader, path, "step1")
    assert model.calls == calls and torch.equal(f1, f2)  # served from the cache
    with torch.no_grad():
        model.lin.weight.add_(1.0)  # weights change, and so does the key
    f3, _ = cached_features(model, loader, path, "step2")
    assert model.calls > calls and not torch.allclose(f3, f1)
    # a different dataset under the same key is recomputed too
    loader_small = DataLoader(TensorDataset(ds.tensors[0][:6], ds.tensors[1][:6]), batch_size=4)
    f4, _ = cached_features(model, loader_small, path, "step2")
    assert f4.shape == (6, 5)


def test_inference_sets_eval_and_no_grad_then_restores_the_mode():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5)).train()
    with inference(model) as device:
        assert device == torch.device("cpu") and not model.training
        out = model(torch.ones(4, 3))
        assert torch.is_inference_mode_enabled() and not out.requires_grad
        assert torch.equal(out, model(torch.ones(4, 3)))  # dropout is off
    assert model.training
    model.eval()
    with pytest.raises(RuntimeError), inference(model):
        raise RuntimeError("boom")
    assert not model.training


def test_autocast_dtype():
    assert autocast_dtype("cpu") is None
    if torch.cuda.is_available():
        assert autocast_dtype("cuda") in (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from dino_nb.model import Head, MultiCropWrapper, build_backbone
    from dino_nb.sources import generate

    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2}
    backbone = build_backbone("vit_tiny_patch16_224", **kwargs)
    sd = MultiCropWrapper(backbone, Head(backbone.num_features, 16, 32, 8, 2)).state_dict()
    config = {"model": "vit_tiny_patch16_224", "model_kwargs": kwargs, "global_size": 32}
    ckpt = save_atomic(
        {"student": sd, "teacher": sd, "config": config, "step": 7}, root / "best_model.pth"
    )
    data = root / "data"
    generate(data, n_train=4, n_val=2)
    return ckpt, data


def test_cli_prints_table_and_writes_figures(tiny_run, tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    ckpt, data = tiny_run
    out = tmp_path / "eval"
    args = ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--device", "cpu"]
    args += ["--batch-size", "16", "--num-workers", "0", "--cache"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "weighted kNN (paper)" in text and "sklearn kNN" in text and "linear probe" in text
    for k in (10, 20, 100, 200):
        assert f"{k:>5}" in text
    names = {p.name for p in out.iterdir()}
    assert {
        "embedding_pca.png",
        "embedding_tsne.png",
        "neighbours.png",
        "confusion_matrix.png",
        "metrics.json",
    } <= names
    assert "attention_0.png" in names and "train_features.pt" in names
    # a second run of the same weights reads the cached training features
    mtime = (out / "train_features.pt").stat().st_mtime_ns
    assert main(args + ["--no-figures"]) == 0
    assert (out / "train_features.pt").stat().st_mtime_ns == mtime
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["step"] == 7
        and metrics["which"] == "teacher"
        and 0 <= metrics["weighted_k20_top1"] <= 1
    )


@pytest.mark.parametrize("bad", ["checkpoint", "data"])
def test_cli_bad_input_is_one_clean_line(tiny_run, tmp_path, capsys, bad):
    ckpt, data = tiny_run
    if bad == "checkpoint":
        ckpt = tmp_path / "missing.pth"
    else:
        data = tmp_path / "nowhere"
    code = main(
        [
            "--checkpoint",
            str(ckpt),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--num-workers",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_module_exit_code(tmp_path):
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "dino_nb.evaluate", "--checkpoint", str(tmp_path / "x.pth")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    # runpy warns when the package __init__ already imported dino_nb.evaluation; that line is
    # the package's business, the CLI's own output is one clean line
    lines = [line for line in r.stderr.splitlines() if not line.startswith("<frozen runpy>")]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint not found"), r.stderr


def test_extract_features_unwraps_multicrop_wrapper():
    from dino_nb.model import Head, MultiCropWrapper

    model = Linear2()
    loader = DataLoader(
        TensorDataset(torch.randn(5, 3, 4, 4), torch.zeros(5, dtype=torch.long)), batch_size=2
    )
    wrapped = MultiCropWrapper(model, Head(5, 8, 16, 4, 2))
    assert torch.equal(extract_features(wrapped, loader)[0], extract_features(model, loader)[0])


# --------------------------------------------------------------------------- without labels


def test_twin_retrieval_against_a_hand_worked_example():
    from dino_nb.evaluation import twin_retrieval

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.1], [1.0, 0.9], [0.0, 1.0]])
    # cos(a_i, b_j): a0 -> b0 (twin); a1 -> b2 (miss); a2 -> b1 (miss)
    # b0 -> a0 (twin); b1 -> a2 (miss); b2 -> a1 (miss): 2 of 6
    assert twin_retrieval(a, b) == pytest.approx(2 / 6)
    assert twin_retrieval(a, a) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        twin_retrieval(a, b[:2])


class _Collapsed(torch.nn.Module):
    """Every image to the same feature: a collapsed model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * torch.ones(x.shape[0], 4)


def test_view_agreement_is_chance_for_a_collapsed_model_and_repeatable(tmp_path):
    from fixtures_data import write_image

    from dino_nb.datasets import ImageFiles, plain_transform
    from dino_nb.evaluation import view_agreement

    for i in range(12):
        write_image(tmp_path / f"{i}.png", size=(40, 40), fmt="PNG", seed=i)
    images = ImageFiles(tmp_path, plain_transform(32))
    collapsed_model = _Collapsed()
    rng_before = torch.get_rng_state()
    collapsed = view_agreement(collapsed_model, images, 32, batch_size=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training random state is untouched
    assert collapsed == {"view_agreement": pytest.approx(1 / 12), "view_agreement_chance": 1 / 12}
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, 8), torch.nn.Flatten())
    first = view_agreement(backbone, images, 32, seed=3)
    assert first == view_agreement(backbone, images, 32, seed=3)  # the same views every call
