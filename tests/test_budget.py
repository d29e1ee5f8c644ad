"""Tests for the wall-time budget and the decision all ranks take, on a fake clock."""

import math
import sys

import pytest
import torch

from dino_nb.budget import Budget, Decision, TimeBudget
from dino_nb.distributed import DistInfo
from dino_nb.step import Schedules
from dino_nb.tools.presets import preset


class FakeClock:
    def __init__(self):
        self.t = 100.0  # an arbitrary origin, as time.monotonic has

    def __call__(self):
        return self.t


def simulate(minutes, step_s, eval_s=0.0, eval_every=None, setup_s=0.0, **kwargs):
    """Drive a TimeBudget the way the training loop does; return (budget, total, seconds used)."""
    clock = FakeClock()
    budget = TimeBudget(minutes, clock=clock, **kwargs)
    budget.start()
    clock.t += setup_s
    if eval_every:  # the evaluation before the first step
        clock.t += eval_s
        budget.record_eval(eval_s)
    step, total = 0, None
    while total is None or step < total:
        clock.t += step_s
        step += 1
        budget.record_step()
        if total is None and budget.calibrated:
            total = budget.total_steps(eval_every=eval_every, final_eval=eval_every is not None)
        if eval_every and step % eval_every == 0 and step != total:
            clock.t += eval_s
            budget.record_eval(eval_s)
    if eval_every:
        clock.t += eval_s  # the final evaluation
    return budget, total, budget.elapsed()


def test_no_evaluations_fill_the_budget_minus_the_margin():
    budget, total, used = simulate(10, 0.5, margin=0.02)
    assert total == 1176  # 1200 steps of 0.5 s in 10 minutes, less 2%
    assert used == pytest.approx(588.0)
    assert budget.step_seconds == pytest.approx(0.5)
    assert budget.seconds_left() == pytest.approx(12.0)


def oracle_count(budget_s, step_s, eval_s, eval_every):
    """Largest n whose run fits: eval at 0, one every eval_every steps before the last, a final one."""
    best = None
    for n in range(1, 100_000):
        seconds = eval_s + n * step_s + eval_s * len(range(eval_every, n, eval_every)) + eval_s
        if seconds <= budget_s:
            best = n
    return best


@pytest.mark.parametrize(
    ("eval_s", "eval_every"), [(20.0, 100), (7.0, 37), (0.0, 50), (30.0, 1000), (1.0, 1), (2.0, 23)]
)
def test_evaluations_are_paid_for(eval_s, eval_every):
    budget, total, used = simulate(10, 0.5, eval_s=eval_s, eval_every=eval_every, margin=0.0)
    assert total == oracle_count(600.0, 0.5, eval_s, eval_every)
    assert used <= 600.0
    # one more step (and any evaluation it brings) would not fit
    assert used + 0.5 + (eval_s if total % eval_every == 0 else 0.0) > 600.0


def test_eval_inside_the_calibration_window_is_not_step_time():
    budget, total, _ = simulate(10, 0.5, eval_s=20.0, eval_every=5)
    assert budget.step_seconds == pytest.approx(0.5)
    assert budget.eval_seconds == 20.0
    assert total == oracle_count(588.0, 0.5, 20.0, 5)


def test_slow_warmup_steps_are_excluded():
    clock = FakeClock()
    budget = TimeBudget(10, clock=clock)
    budget.start()
    for step_s in [30.0, 5.0, 5.0] + [0.5] * 60:
        clock.t += step_s
        budget.record_step()
    assert budget.step_seconds == pytest.approx(0.5)
    assert budget.total_steps() == 63 + math.floor((588 - 70) / 0.5)


def test_short_budget_decides_at_max_fraction():
    # 1 s steps, 30 s budget: 20 timed steps would take most of it; decide at 25% (7.5 s)
    clock = FakeClock()
    budget = TimeBudget(0.5, clock=clock, margin=0.02, max_fraction=0.25)
    budget.start()
    for _ in range(7):
        clock.t += 1.0
        budget.record_step()
    assert not budget.calibrated
    clock.t += 1.0
    budget.record_step()
    assert budget.calibrated
    assert budget.total_steps() == 8 + math.floor(29.4 - 8)


@pytest.mark.parametrize("setup_s", [0.0, 59.0, 120.0])
def test_budget_shorter_than_calibration_gives_one_more_step(setup_s):
    # a 40 s step in a 1-minute budget (or setup that used it all): stop after the next step
    budget, total, _ = simulate(1, 40.0, setup_s=setup_s)
    assert total == 2 == budget.steps_done


def test_fixed_count_never_changes():
    clock = FakeClock()
    budget = TimeBudget(10, clock=clock)
    budget.start()
    with pytest.raises(RuntimeError, match="record_step"):
        budget.total_steps()
    while not budget.calibrated:
        clock.t += 0.5
        budget.record_step()
    total = budget.total_steps(eval_every=100)
    for _ in range(50):  # steps become 10x slower: the recipe's length must not move
        clock.t += 5.0
        budget.record_step()
    budget.record_eval(100.0)
    assert budget.total_steps() == budget.total_steps(eval_every=1) == budget.total == total
    assert budget.calibrated


@pytest.mark.parametrize("minutes", [0, -1, -0.5, float("nan"), float("inf"), "10", None])
def test_invalid_minutes(minutes):
    with pytest.raises(ValueError, match="positive number of minutes"):
        TimeBudget(minutes)


def test_invalid_fractions_and_unstarted_clock():
    with pytest.raises(ValueError, match="margin"):
        TimeBudget(1, margin=1.0)
    with pytest.raises(ValueError, match="min_fraction"):
        TimeBudget(1, min_fraction=0.5, max_fraction=0.1)
    with pytest.raises(RuntimeError, match="start"):
        TimeBudget(1).seconds_left()


def test_a_slow_start_after_the_warmup_does_not_shrink_the_run():
    """A loader that takes 10 steps to catch up (measured: 1.7 s, then 0.4 s per step) must not
    make the run plan for 1.7-second steps: the later half of the window is the step time."""
    clock = FakeClock()
    budget = TimeBudget(5, clock=clock, margin=0.0)
    budget.start()
    for step_s in [3.0] * 3 + [1.7] * 7 + [0.4] * 40:
        clock.t += step_s
        budget.record_step()
    assert budget.calibrated
    assert budget.step_seconds == pytest.approx(0.4)
    used = 9.0 + 7 * 1.7 + 40 * 0.4
    assert budget.total_steps() == 50 + math.floor((300 - used) / 0.4 + 1e-9)


# ----------------------------------------------------------------------------- Budget


class FakeRun:
    """What :class:`Budget` reads of a run (config, process, global batch, schedules).

    ``laid`` records the length of every assignment of ``schedules`` after the first, which
    :func:`~dino_nb.step.build_run` makes.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, **overrides):
        self.cfg = preset(
            "cpu", **{"epochs": 2, "eval_every": 1000, "max_steps": None, **overrides}
        )
        self.info = DistInfo(rank, world_size, rank, torch.device("cpu"))
        self.global_batch = self.cfg.batch_size * world_size
        self._schedules = Schedules(self.cfg, self.cfg.epochs * 5, self.global_batch)  # 5 per epoch
        self.laid: list[int] = []

    @property
    def schedules(self) -> Schedules:
        return self._schedules

    @schedules.setter
    def schedules(self, value: Schedules) -> None:
        self.laid.append(len(value))
        self._schedules = value


def agree_over(budgets, step, signalled=()):
    """What :func:`~dino_nb.distributed.agree` does across ranks: sum the proposals, all follow."""
    proposals = [b.proposal(step, rank in signalled) for rank, b in enumerate(budgets)]
    summed = [sum(column) for column in zip(*proposals, strict=True)]
    return [b.follow(summed) for b in budgets]


def started(minutes, clock):
    budget = TimeBudget(minutes, clock=clock)
    budget.start()
    return budget


def test_two_ranks_agree_on_rank_0s_step_count_and_stop_together():
    """Rank 0 alone has a clock (1 s per step, 1 minute): both ranks lay its count, fix it, stop."""
    clock = FakeClock()
    runs = [FakeRun(rank, 2, minutes=1.0) for rank in range(2)]
    budgets = [Budget(runs[0], started(1.0, clock)), Budget(runs[1], None)]
    assert [b.last_step for b in budgets] == [sys.maxsize] * 2  # open-ended until it is fixed
    step, settled_at = 0, []
    while step < budgets[0].last_step:
        clock.t += 1.0
        step += 1
        decisions = agree_over(budgets, step)
        assert decisions[0] == decisions[1]
        assert len(runs[0].schedules) == len(runs[1].schedules)  # the same recipe on both ranks
        if decisions[0].settled:
            settled_at.append(step)
    assert settled_at == [15]  # 25% of the minute: calibrated
    assert step == 58 == len(runs[0].schedules) == len(runs[1].schedules)  # 15 + (58.8 - 15) // 1
    assert budgets[0].state() == budgets[1].state() == {"total_steps": 58, "schedule_fixed": True}


def test_schedules_are_laid_over_the_estimate_then_never_again_once_fixed():
    """While measuring, the schedules follow the estimate; once fixed, nothing lays them again."""
    clock = FakeClock()
    run = FakeRun(minutes=1.0)
    budget = Budget(run, started(1.0, clock))
    assert run.laid == []  # build_run laid the first ones
    step, decision = 0, Decision(budget.last_step)
    while step < decision.last_step and not decision.stop:
        step += 1
        clock.t += (0.5, 1.0, 2.0)[step % 3] if step <= 15 else 3.0  # noisy, then much slower
        decision = budget.agree(step, signalled=False)
        if decision.settled:
            fixed, laid = run.schedules, len(run.laid)
    assert budget.time_budget.total is not None
    assert len(run.laid) > 1, "the estimate moved while measuring"
    assert all(a != b for a, b in zip(run.laid, run.laid[1:], strict=False))  # only on a change
    assert len(run.laid) == laid and run.schedules is fixed  # never after the count was fixed
    assert len(run.schedules) == budget.time_budget.total == run.laid[-1]
    assert decision.stop == "time" and step < len(run.schedules)  # the slow steps ran out of time


def test_without_a_budget_the_schedules_of_build_run_stay():
    run = FakeRun(max_steps=7)
    first = run.schedules
    budget = Budget(run, None)
    decisions = [budget.agree(step, signalled=False) for step in range(1, 8)]
    assert run.schedules is first
    assert decisions[0] == Decision(last_step=7)  # max_steps caps the 10 steps of 2 epochs
    assert not any(d.settled or d.stop for d in decisions)


def test_a_signal_on_any_rank_stops_every_rank():
    budgets = [Budget(FakeRun(rank, 2), None) for rank in range(2)]
    assert [d.stop for d in agree_over(budgets, 1)] == [None, None]
    assert [d.stop for d in agree_over(budgets, 2, signalled={1})] == ["signal", "signal"]


@pytest.mark.parametrize(
    ("saved", "minutes", "total", "fixed"),
    [
        ({"config": {"minutes": 1.0}, "total_steps": 58, "schedule_fixed": True}, 1.0, 58, True),
        ({"config": {"minutes": 1.0}, "total_steps": 58, "schedule_fixed": False}, 1.0, 10, False),
        ({"config": {"minutes": None}, "total_steps": 4, "schedule_fixed": True}, None, 10, True),
        ({"config": {"minutes": 1.0}, "total_steps": 58, "schedule_fixed": True}, None, 58, True),
    ],
)
def test_a_resumed_budget_run_keeps_its_count_and_an_epoch_run_follows_epochs(
    saved, minutes, total, fixed
):
    """A fixed budget count is kept; one not yet fixed is measured again; epochs may extend."""
    run = FakeRun(minutes=minutes)
    budget = Budget(run, None, saved)
    assert len(run.schedules) == total and budget.fixed == fixed
