"""Oracle tests for the collapse signals (the monitor that watches them: test_books.py)."""

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
    mean_entropy,
    teacher_student_kl,
)


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
