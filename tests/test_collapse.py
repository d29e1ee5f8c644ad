import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from dino_nb.notebook.collapse import (  # noqa: E402
    SETTINGS,
    CollapseRun,
    CollapseSetting,
    collapse_figure,
    collapse_study,
    prototype_study,
    prototype_use,
    run_setting,
)


def test_run_setting_shapes_and_determinism():
    a = run_setting(SETTINGS[0], steps=5, out_dim=16, batch_size=8)
    b = run_setting(SETTINGS[0], steps=5, out_dim=16, batch_size=8)
    assert len(a.entropy) == len(a.kl) == len(a.loss) == len(a.batch_entropy) == 5
    assert a.entropy == b.entropy and a.kl == b.kl
    assert a.max_entropy == pytest.approx(math.log(16))
    for h, hb, kl, loss in zip(a.entropy, a.batch_entropy, a.kl, a.loss, strict=True):
        assert 0 <= h <= a.max_entropy + 1e-5 and 0 <= hb <= a.max_entropy + 1e-5 and kl >= -1e-6
        assert math.isfinite(loss)
    with pytest.raises(ValueError):
        run_setting(SETTINGS[0], steps=0)


def test_run_setting_keeps_global_rng():
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    run_setting(SETTINGS[1], steps=2, out_dim=8, batch_size=4)
    assert torch.equal(torch.rand(1), x)


@pytest.mark.slow
def test_collapse_study_reproduces_the_paper():
    # Caron et al. 2021's collapse study: centering alone -> uniform, sharpening alone -> one-hot
    torch.set_num_threads(1)
    runs = {r.setting.name: r for r in collapse_study(steps=300)}
    both, centering, sharpening = (
        runs["centering + sharpening"],
        runs["centering only"],
        runs["sharpening only"],
    )
    log_k = both.max_entropy

    def tail(xs):
        return sum(xs[-20:]) / 20

    assert tail(centering.entropy) > 0.95 * log_k
    assert tail(sharpening.entropy) < 0.1
    assert tail(sharpening.batch_entropy) < 0.5 * tail(both.batch_entropy)
    assert tail(centering.kl) < 0.02 and tail(sharpening.kl) < 0.02
    assert tail(both.kl) > 10 * max(tail(sharpening.kl), tail(centering.kl))
    # teacher = student after every step: the batch piles onto a few dimensions and the
    # targets jump with the student, so the KL stays far above the EMA teacher's
    no_ema = runs["no momentum teacher"]
    assert tail(no_ema.batch_entropy) < 0.5 * tail(both.batch_entropy)
    assert tail(no_ema.kl) > 2 * tail(both.kl)


def test_run_setting_dtype():
    torch.set_default_dtype(torch.float32)
    for dtype in (torch.float32, torch.float64):
        run = run_setting(SETTINGS[3], steps=3, out_dim=8, batch_size=4, dtype=dtype)
        assert len(run.kl) == 3 and all(math.isfinite(k) for k in run.kl)
    assert torch.get_default_dtype() == torch.float32  # the float64 init does not leak
    # float64 is the default: the same curves as asking for it
    a = run_setting(SETTINGS[3], steps=3, out_dim=8, batch_size=4)
    assert (
        a.kl == run_setting(SETTINGS[3], steps=3, out_dim=8, batch_size=4, dtype=torch.float64).kl
    )
    assert (
        a.kl != run_setting(SETTINGS[3], steps=3, out_dim=8, batch_size=4, dtype=torch.float32).kl
    )
    with pytest.raises(ValueError, match="dtype"):
        run_setting(SETTINGS[0], steps=1, dtype=torch.float16)


_TAILS = """
import sys, torch
from dino_nb.notebook.collapse import SETTINGS, run_setting
torch.set_num_threads(1)
r = run_setting(SETTINGS[3], steps=int(sys.argv[1]))
print(*(f"{sum(xs[-20:]) / 20:.2f}" for xs in (r.entropy, r.batch_entropy, r.kl)))
"""


@pytest.mark.slow
def test_no_momentum_arm_prints_the_same_on_other_kernels():
    # the arm oscillates; notebook 03 prints its tails at 2 decimals, which must not depend
    # on the CPU: ATen's plain kernels (ATEN_CPU_CAPABILITY=default) stand in for another CPU
    import os
    import subprocess
    import sys

    def tails(capability):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        out = subprocess.run(
            [sys.executable, "-c", _TAILS, "400"], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert tails(None) == tails("default")


def test_collapse_figure():
    runs = collapse_study(
        settings=[CollapseSetting("x", True, True)], steps=3, out_dim=8, batch_size=4
    )
    fig = collapse_figure(runs)
    assert len(fig.axes) == 3
    with pytest.raises(ValueError):
        collapse_figure([])


# --------------------------------------------------------------------------- K, the number of prototypes


def test_run_setting_keeps_the_trained_teachers_targets():
    run = run_setting(SETTINGS[0], steps=3, out_dim=16, batch_size=8)
    assert run.targets.shape == (2048, 16) and run.clusters.shape == (2048,)
    assert torch.allclose(run.targets.sum(-1), torch.ones(2048, dtype=run.targets.dtype))
    assert set(run.clusters.tolist()) == set(range(8))


def test_prototype_use_counts_and_purity():
    # 6 samples of clusters [0, 0, 1, 1, 2, 2]; prototype 0 takes both 0s and a 1, prototype 2
    # the other 1, prototype 3 both 2s: majorities 2 + 1 + 2 = 5 of 6 samples
    top = torch.tensor([0, 0, 0, 2, 3, 3])
    targets = torch.nn.functional.one_hot(top, 4).double()  # (6, 4), entropy 0
    run = CollapseRun(SETTINGS[0], targets=targets, clusters=torch.tensor([0, 0, 1, 1, 2, 2]))
    use = prototype_use(run)
    assert (use.out_dim, use.used) == (4, 3)
    assert use.purity == pytest.approx(5 / 6)
    assert use.entropy == pytest.approx(0.0)
    shares = (3 / 6, 1 / 6, 2 / 6)  # of prototypes 0, 2 and 3 in the batch-mean target
    assert use.batch_entropy == pytest.approx(-sum(q * math.log(q) for q in shares))
    with pytest.raises(ValueError, match="targets"):
        prototype_use(CollapseRun(SETTINGS[0]))


@pytest.mark.slow
def test_few_prototypes_merge_clusters_many_do_not():
    torch.set_num_threads(1)
    few, many = prototype_study(out_dims=(2, 64), steps=400)
    assert few.used <= 2 and few.purity < 0.5  # 8 clusters on 2 prototypes
    assert many.used >= 8 and many.purity > 0.95
