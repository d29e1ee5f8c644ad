"""Oracle tests for the DINO loss against a plain-Python evaluation of Eq. 1-4 of the paper."""

import math

import pytest
import torch

from dino_nb.loss import Loss, sinkhorn_knopp

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
