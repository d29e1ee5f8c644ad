"""Oracle tests for the DINO loss against a plain-Python evaluation of Eq. 1-4 of the paper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino_nb.loss import (
    Loss,
    batch_mean_entropy,
    collapse_signals,
    entropy,
    kl_divergence,
    koleo_loss,
    mean_entropy,
    sinkhorn_knopp,
    teacher_student_kl,
)
from dino_nb.model import MultiCropWrapper

OUT = 5


def softmax(xs, temp):
    m = max(x / temp for x in xs)
    e = [math.exp(x / temp - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def log_softmax(xs, temp):
    m = max(x / temp for x in xs)
    lse = m + math.log(sum(math.exp(x / temp - m) for x in xs))
    return [x / temp - lse for x in xs]


def hand_loss(student, teacher, center, t_temp, s_temp, same_view=False):
    """Mean over (teacher view, student view) pairs of the batch mean of H(P_t, P_s)."""
    student = [s.tolist() for s in student]
    teacher = [t.tolist() for t in teacher]
    center = center.reshape(-1).tolist()
    terms = []
    for ti, t in enumerate(teacher):
        for si, s in enumerate(student):
            if ti == si and not same_view:
                continue
            per_sample = []
            for t_row, s_row in zip(t, s, strict=True):
                p_t = softmax([a - c for a, c in zip(t_row, center, strict=True)], t_temp)
                logp_s = log_softmax(s_row, s_temp)
                per_sample.append(-sum(p * q for p, q in zip(p_t, logp_s, strict=True)))
            terms.append(sum(per_sample) / len(per_sample))
    return sum(terms) / len(terms)


def hand_center(center, teacher, m):
    rows = [r for t in teacher for r in t.tolist()]
    mean = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    return [m * c + (1 - m) * b for c, b in zip(center.reshape(-1).tolist(), mean, strict=True)]


def outputs(n_student=4, n_teacher=2, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(n, OUT, generator=g) for _ in range(n_student)]
    teacher = [torch.randn(n, OUT, generator=g) for _ in range(n_teacher)]
    return student, teacher


def test_equals_hand_computation():
    loss = Loss(OUT, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9)
    with torch.no_grad():
        loss.center.copy_(torch.randn(1, OUT) * 0.3)
    student, teacher = outputs()
    expected = hand_loss(student, teacher, loss.center.clone(), 0.04, 0.1)
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_skips_same_view_pairs():
    student, teacher = outputs(n_student=3, n_teacher=2)
    loss = Loss(OUT)
    value = loss(student, teacher).item()
    skip = hand_loss(student, teacher, torch.zeros(1, OUT), 0.04, 0.1)
    include = hand_loss(student, teacher, torch.zeros(1, OUT), 0.04, 0.1, same_view=True)
    assert abs(skip - include) > 1e-2  # the construction tells the two apart
    assert value == pytest.approx(skip, rel=1e-5)


def test_student_view_matching_the_only_teacher_view_does_not_matter():
    student, teacher = outputs(n_student=3, n_teacher=1)
    base = Loss(OUT)(student, teacher)
    changed0 = [student[0] * 10 + 3, *student[1:]]
    changed1 = [student[0], student[1] * 10 + 3, student[2]]
    assert Loss(OUT)(changed0, teacher).item() == pytest.approx(base.item(), rel=1e-6)
    assert abs(Loss(OUT)(changed1, teacher).item() - base.item()) > 1e-2


def test_center_follows_ema_over_two_calls():
    m = 0.7
    loss = Loss(OUT, center_momentum=m)
    s1, t1 = outputs(seed=1)
    s2, t2 = outputs(seed=2)
    loss(s1, t1)
    c1 = hand_center(torch.zeros(1, OUT), t1, m)
    torch.testing.assert_close(loss.center, torch.tensor([c1]))
    value2 = loss(s2, t2).item()  # the second call uses the first center
    assert value2 == pytest.approx(hand_loss(s2, t2, torch.tensor(c1), 0.04, 0.1), rel=1e-5)
    c2 = hand_center(torch.tensor(c1), t2, m)
    torch.testing.assert_close(loss.center, torch.tensor([c2]))


def test_center_is_a_buffer_and_momentum_one_keeps_it_zero():
    loss = Loss(OUT, center_momentum=1.0)
    assert "center" in dict(loss.named_buffers()) and "center" in loss.state_dict()
    assert list(loss.parameters()) == []
    assert loss.center.shape == (1, OUT)
    s, t = outputs()
    loss(s, t)
    assert torch.all(loss.center == 0)


def test_teacher_temp_attribute_change_takes_effect():
    s, t = outputs()
    loss = Loss(OUT, teacher_temp=0.04)
    loss.teacher_temp = 0.07
    expected = hand_loss(s, t, torch.zeros(1, OUT), 0.07, 0.1)
    assert loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - hand_loss(s, t, torch.zeros(1, OUT), 0.04, 0.1)) > 1e-3


def test_gradient_flows_to_student_only():
    s, t = outputs()
    s = [x.requires_grad_() for x in s]
    t = [x.requires_grad_() for x in t]
    Loss(OUT)(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


def test_float32_result_under_bf16_inputs():
    s, t = outputs()
    s16, t16 = [x.bfloat16() for x in s], [x.bfloat16() for x in t]
    loss = Loss(OUT)
    value = loss(s16, t16)
    assert value.dtype == torch.float32
    assert loss.center.dtype == torch.float32
    ref = hand_loss(
        [x.float() for x in s16], [x.float() for x in t16], torch.zeros(1, OUT), 0.04, 0.1
    )
    assert value.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(teacher_temp=0.0),
        dict(teacher_temp=-0.04),
        dict(student_temp=0.0),
        dict(student_temp=-1.0),
        dict(center_momentum=1.5),
        dict(center_momentum=-0.1),
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        Loss(OUT, **kwargs)


def test_too_few_views_raise():
    s, t = outputs(n_student=1, n_teacher=1)
    with pytest.raises(ValueError):
        Loss(OUT)(s, t)
    s, t = outputs(n_student=2, n_teacher=0)
    with pytest.raises(ValueError):
        Loss(OUT)(s, [])


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_targets_given_by_the_caller_give_the_same_loss_and_center(centering):
    s, t = outputs()
    computed, given = (Loss(OUT, center_momentum=0.5, centering=centering) for _ in range(2))
    computed.center.fill_(0.3)
    given.center.fill_(0.3)
    expected = computed(s, t)
    value = given(s, t, given.teacher_probs(t))  # the targets a training step takes first
    assert torch.equal(value, expected)
    assert torch.equal(given.center, computed.center)
    # targets from other logits are used as given: the loss does not recompute them
    other = given.teacher_probs([x.flip(0) for x in t])
    assert not torch.allclose(given(s, t, other), expected)
    with pytest.raises(ValueError, match="1 targets for 2 teacher views"):
        given(s, t, other[:1])


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_changes_nothing_even_for_large_logits(centering, dtype):
    # The step runs the loss under autocast, on the head's half-precision logits. A teacher
    # whose logits share an offset of 50 has scores near 50 / tau_t = 1250, where fp16 holds
    # only whole numbers (bf16 multiples of 8), yet its targets hang on score differences of
    # ~1; a student at scale 50 has scores in the hundreds. Every op must run on float32
    # copies: the result is the float32 loss of the same values up to float32 rounding
    # (assert_close's float32 tolerance, rtol 1.3e-6 and atol 1e-5).
    g = torch.Generator().manual_seed(0)
    student = [(50 * torch.randn(16, 64, generator=g)).to(dtype) for _ in range(4)]  # 4 x (16, 64)
    teacher = [(50 + 0.1 * torch.randn(16, 64, generator=g)).to(dtype) for _ in range(2)]
    losses = [Loss(64, centering=centering) for _ in range(2)]
    as_float = [[x.float() for x in xs] for xs in (student, teacher)]  # the same values
    expected_targets = losses[0].teacher_probs(as_float[1])
    expected = losses[0](*as_float, expected_targets)
    with torch.autocast("cpu", dtype=dtype):
        targets = losses[1].teacher_probs(teacher)
        value = losses[1](student, teacher, targets)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, expected)
    for p, q in zip(targets, expected_targets, strict=True):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(losses[1].center, losses[0].center)


# --- Sinkhorn-Knopp targets (centering="sinkhorn") ------------------------------------------


def hand_sinkhorn(scores, iters):
    """Plain-Python Sinkhorn-Knopp on a list of rows (samples) of scores (prototypes)."""
    n, k = len(scores), len(scores[0])
    q = [[math.exp(scores[b][j]) for b in range(n)] for j in range(k)]  # (K, B)
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]  # each prototype 1/K
        cols = [sum(q[j][b] for j in range(k)) for b in range(n)]
        q = [[q[j][b] / cols[b] / n for b in range(n)] for j in range(k)]  # each sample 1/B
    return [[q[j][b] * n for j in range(k)] for b in range(n)]  # (B, K)


def test_sinkhorn_equals_hand_computation():
    scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 3
    for iters in (1, 3):
        got = sinkhorn_knopp(scores, iters)
        assert torch.allclose(got, torch.tensor(hand_sinkhorn(scores.tolist(), iters)), atol=1e-6)
        assert torch.allclose(got.sum(dim=1), torch.ones(6), atol=1e-6)  # a distribution per sample


def test_sinkhorn_balances_prototypes_and_ignores_shared_offsets():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(64, 16, generator=g) * 2
    q = sinkhorn_knopp(scores, iters=20)
    assert torch.allclose(q.sum(dim=0), torch.full((16,), 64 / 16), rtol=1e-3)  # equal mass
    # a score that every sample shares (one prototype favoured for all) is divided out at once:
    # what the EMA center has to learn over many steps, the balancing does in every batch
    favoured = scores + torch.randn(1, 16, generator=g) * 10
    assert torch.allclose(sinkhorn_knopp(favoured, 3), sinkhorn_knopp(scores, 3), atol=1e-6)
    assert not torch.allclose(torch.softmax(favoured, -1), torch.softmax(scores, -1), atol=0.1)
    # samples that all score alike get the same, uniform target
    same = sinkhorn_knopp(torch.randn(1, 16, generator=g).expand(8, 16), iters=3)
    assert torch.allclose(same, torch.full((8, 16), 1 / 16), atol=1e-6)


def test_sinkhorn_targets_in_the_loss_leave_the_center_alone():
    g = torch.Generator().manual_seed(2)
    teacher = [torch.randn(8, OUT, generator=g) for _ in range(2)]
    student = [torch.randn(8, OUT, generator=g) for _ in range(3)]
    loss = Loss(OUT, teacher_temp=0.5, student_temp=0.3, centering="sinkhorn")
    targets = loss.teacher_probs(teacher)
    expected = sinkhorn_knopp(torch.cat(teacher) / 0.5, 3)  # both views balanced together
    assert torch.allclose(torch.cat(targets), expected)
    value = loss(student, teacher)
    logp = [torch.log_softmax(s / 0.3, dim=-1) for s in student]
    pairs = [(t, s) for t in range(2) for s in range(3) if t != s]
    by_hand = sum(-(targets[t] * logp[s]).sum(-1).mean() for t, s in pairs) / len(pairs)
    assert torch.allclose(value, by_hand)
    assert torch.equal(loss.center, torch.zeros(1, OUT))  # not used, not moved
    with pytest.raises(ValueError, match="centering must be one of"):
        Loss(OUT, centering="softmax")
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        Loss(OUT, centering="sinkhorn", sinkhorn_iters=0)


def _sinkhorn_on_rank(rank: int, port: int, scores: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        half = scores.chunk(2)[rank]  # this rank's samples
        torch.save(sinkhorn_knopp(half, iters=3), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_over_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    """The prototype sums are all-reduced: 2 ranks x 6 samples give 1 rank x 12's targets."""
    import socket

    import torch.multiprocessing as mp

    scores = torch.randn(12, 7, generator=torch.Generator().manual_seed(3)) * 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sinkhorn_on_rank, args=(port, scores, str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.allclose(torch.cat(parts), sinkhorn_knopp(scores, iters=3), atol=1e-6)


# --------------------------------------------------------------------------- test_koleo


def test_equals_hand_computation_on_a_circle():
    # unit vectors at 0, 10 and 90 degrees: the nearest neighbours are 10, 0 and 10 degrees away,
    # 10, 10 and 80 degrees; a chord of angle a has length 2 sin(a / 2)
    angles = torch.tensor([0.0, 10.0, 90.0]) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5]])
    chords = [2 * math.sin(math.radians(a) / 2) for a in (10, 10, 80)]
    expected = -sum(math.log(c) for c in chords) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)


def test_ignores_scale_and_order_and_is_float32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    value = koleo_loss(x)
    assert torch.allclose(koleo_loss(7 * x), value)
    assert torch.allclose(koleo_loss(x[torch.randperm(16, generator=g)]), value)
    assert koleo_loss(x.to(torch.bfloat16)).dtype == torch.float32


def test_crowded_embeddings_cost_more_and_the_gradient_spreads_them():
    g = torch.Generator().manual_seed(1)
    spread = torch.randn(32, 16, generator=g)
    crowded = torch.randn(1, 16, generator=g) + 0.05 * spread
    assert koleo_loss(crowded) > koleo_loss(spread) + 1.0
    x = crowded.clone().requires_grad_(True)
    koleo_loss(x).backward()
    with torch.no_grad():
        assert koleo_loss(x - 0.01 * x.grad) < koleo_loss(crowded)  # one descent step
    same = koleo_loss(torch.ones(4, 3))  # identical embeddings: large, but finite
    assert torch.isfinite(same) and same > 10


@pytest.mark.parametrize("shape", [(1, 8), (8,), (2, 3, 4)])
def test_refuses_what_has_no_neighbours(shape):
    with pytest.raises(ValueError, match="koleo_loss needs"):
        koleo_loss(torch.randn(*shape))


def test_the_wrapper_returns_the_embeddings_the_head_reads():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(6))
    head = torch.nn.Linear(6, 5)
    model = MultiCropWrapper(backbone, head)
    crops = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    logits, embeddings = model(crops, return_embeddings=True)
    plain = model(crops)
    assert len(embeddings) == 2 and all(e.shape == (4, 6) for e in embeddings)
    assert all(torch.equal(a, b) for a, b in zip(logits, plain, strict=True))
    assert torch.allclose(embeddings[1], backbone(crops[1]))
    assert all(torch.allclose(head(e), lo) for e, lo in zip(embeddings, logits, strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nearest_neighbour_is_found_in_float32_under_autocast(dtype):
    # Embeddings of a crowded batch differ by ~1e-3: their cosines all round to the same
    # half-precision number near 1 (spacing 2^-11 in fp16, 2^-8 in bf16), so a neighbour
    # search run by autocast in half precision picks a wrong neighbour for most rows (97% of
    # them over 20 seeds before the search was kept in float32) and the loss drops.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 192, generator=g) + 1e-3 * torch.randn(64, 192, generator=g)  # (64, 192)
    expected = koleo_loss(x)
    with torch.autocast("cpu", dtype=dtype):
        under_autocast = koleo_loss(x)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- test_signals


def test_entropy_hand_values():
    assert torch.allclose(entropy(torch.full((3, 8), 1 / 8)), torch.full((3,), math.log(8)))
    assert torch.equal(entropy(torch.tensor([[0.0, 1.0, 0.0]])), torch.zeros(1))
    p = torch.tensor([[0.25, 0.75]])
    assert entropy(p).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_kl_hand_values():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q.log()).item() == pytest.approx(expected)
    assert torch.allclose(kl_divergence(p, p.log()), torch.zeros(1), atol=1e-7)


def test_mean_and_batch_entropy_tell_the_two_collapses_apart():
    k = 16
    uniform = [torch.full((4, k), 1 / k)] * 2
    assert mean_entropy(uniform).item() == pytest.approx(math.log(k))
    assert batch_mean_entropy(uniform).item() == pytest.approx(math.log(k))
    same = [F.one_hot(torch.full((4,), 3), k).float()] * 2  # every sample on prototype 3
    assert mean_entropy(same).item() == 0 and batch_mean_entropy(same).item() == 0
    # healthy: one-hot targets spread over 4 prototypes -> batch-mean entropy log 4
    spread = [F.one_hot(torch.arange(4), k).float(), F.one_hot(torch.arange(4), k).float()]
    assert mean_entropy(spread).item() == 0
    assert batch_mean_entropy(spread).item() == pytest.approx(math.log(4))
    # two views, hand mix: view 0 uniform over 2, view 1 one-hot -> mean entropy (log 2 + 0) / 2
    a = torch.tensor([[0.5, 0.5]])
    b = torch.tensor([[1.0, 0.0]])
    assert mean_entropy([a, b]).item() == pytest.approx(math.log(2) / 2)
    assert batch_mean_entropy([a, b]).item() == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )


def random_outputs(n_crops=4, n=5, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(n, k, generator=g, requires_grad=True) for _ in range(n_crops)]
    teacher = [torch.randn(n, k, generator=g) * 2 for _ in range(2)]
    return student, teacher


def test_kl_pairs_by_a_plain_loop():
    student, teacher = random_outputs()
    p_t = [F.softmax(t, dim=-1) for t in teacher]
    log_p_s = [F.log_softmax(s, dim=-1) for s in student]
    total, pairs = 0.0, 0
    for t in range(2):
        for s in range(4):
            if s == t:
                continue
            for i in range(5):
                total += (
                    sum(
                        p_t[t][i, j].item()
                        * (math.log(p_t[t][i, j].item()) - log_p_s[s][i, j].item())
                        for j in range(7)
                    )
                    / 5
                )
            pairs += 1
    assert pairs == 6
    assert teacher_student_kl(p_t, log_p_s).item() == pytest.approx(total / pairs, rel=1e-5)
    # the same view is skipped: student view 0 differs from teacher view 0 but is never compared
    same = teacher_student_kl(p_t[:1], [p_t[1].log(), p_t[0].log()])
    assert same.item() == pytest.approx(0, abs=1e-6)
    # every other student view is compared: a mismatch in the last one shows
    assert teacher_student_kl(p_t[:1], [p_t[1].log(), p_t[0].log(), p_t[1].log()]).item() > 0.01
    with pytest.raises(ValueError, match="pairs"):
        teacher_student_kl(p_t[:1], log_p_s[:1])


@pytest.mark.parametrize("n_crops", [2, 4])
def test_loss_is_teacher_entropy_plus_kl(n_crops):
    # cross-entropy = entropy + KL, over the same (teacher view, student view) pairs as the loss
    student, teacher = random_outputs(n_crops=n_crops)
    loss_fn = Loss(7, teacher_temp=0.5, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.normal_()  # a non-zero center, so that the probabilities must be taken before it moves
    p_t = loss_fn.teacher_probs(teacher)  # before the forward updates the center
    log_p_s = [F.log_softmax(s / loss_fn.student_temp, dim=-1) for s in student]
    loss = loss_fn(student, teacher)
    h, kl = mean_entropy(p_t), teacher_student_kl(p_t, log_p_s)
    assert loss.item() == pytest.approx((h + kl).item(), rel=1e-5)
    signals = collapse_signals(p_t, loss)
    assert signals["kl"].item() == pytest.approx(kl.item(), abs=1e-5)
    for name, value in signals.items():  # 0-dim tensors, no graph: the caller decides when to sync
        assert value.shape == () and not value.requires_grad, name
    assert signals["teacher_entropy"].item() == pytest.approx(h.item())
    assert signals["batch_entropy"].item() == pytest.approx(entropy(torch.cat(p_t).mean(0)).item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_signals_under_autocast_equal_float32(dtype):
    # The step takes them inside autocast, from half-precision logits: they must be the float32
    # signals of the same values. Entropies of probabilities near 0 need float32 targets (the
    # log's clamp at 1e-12 is 0 in fp16, and 0 * log 0 is NaN).
    student, teacher = random_outputs(n_crops=4)
    student, teacher = [s.to(dtype) * 50 for s in student], [t.to(dtype) * 50 for t in teacher]
    plain, autocast = Loss(7), Loss(7)  # each moves its center once
    as_float = [[x.float() for x in xs] for xs in (student, teacher)]  # the same values
    p_t = plain.teacher_probs(as_float[1])
    expected = collapse_signals(p_t, plain(*as_float, p_t))
    with torch.autocast("cpu", dtype=dtype):
        p_t = autocast.teacher_probs(teacher)
        found = collapse_signals(p_t, autocast(student, teacher, p_t))
    for name, value in found.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        torch.testing.assert_close(value, expected[name], msg=name)
