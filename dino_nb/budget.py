"""How long a run is, and the one decision all ranks take after every step.

Every schedule of the recipe is a function of the total step count. Without ``--minutes``
that count is ``cfg.epochs`` of the data; with it, :class:`TimeBudget` turns the minutes
into a step count after timing the first steps, and :class:`Budget` makes every rank agree,
after each step, on that count and on whether to stop (a signal, or the budget running out).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .distributed import agree
from .step import Run, Schedules


class TimeBudget:
    """Turns ``minutes`` into a fixed step count after a short calibration phase.

    Every schedule of the recipe (lr warmup + cosine, weight decay, teacher momentum, teacher
    temperature warmup, last-layer freeze) is a function of the total step count, so a budget
    in minutes must become a step count *once*, early, and then never move: a count that kept
    changing would stretch the cosine under a running optimizer. The rule:

    1. **Warm-up steps** (the first 3): compilation, cuDNN autotuning and the data loader's
       first batches make them slow; they count in the elapsed time but not in the step time.
    2. **Calibration**: the next steps are timed until there are at least ``min_steps`` of
       them *and* ``min_fraction`` of the budget has passed (one noisy step cannot decide the
       run), or until ``max_fraction`` has passed (a slow model on a short budget must decide
       anyway). The later half of the timed steps gives the step time.
    3. **Fix** the largest count ``N`` with
       ``elapsed + (N - done) * step_seconds + evals(N) * eval_seconds <= (1 - margin) * budget``,
       where ``evals(N)`` counts the evaluations still to come (every ``eval_every`` steps
       before the last, plus the final one). The margin absorbs jitter and the last checkpoint.

    Use: ``start()`` when the run starts; ``record_step()`` after each step; ``record_eval(s)``
    after each evaluation; once ``calibrated``, ``total_steps(eval_every=E)`` sizes the schedules.

    Args:
        minutes: the whole run's wall time, setup and evaluations included.
        clock: seconds from an arbitrary origin; injectable so tests use a fake clock.
        warmup_steps: first steps excluded from the step time (compilation, autotuning).
        min_steps: fewest timed steps before deciding.
        min_fraction: least fraction of the budget spent before deciding.
        max_fraction: decide by this fraction of the budget whatever ``min_steps`` says.
        margin: fraction of the budget kept free for jitter and the final checkpoint.
    """

    def __init__(
        self,
        minutes: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        warmup_steps: int = 3,
        min_steps: int = 20,
        min_fraction: float = 0.05,
        max_fraction: float = 0.25,
        margin: float = 0.02,
    ) -> None:
        if not (isinstance(minutes, int | float) and math.isfinite(minutes) and minutes > 0):
            raise ValueError(
                f"the time budget must be a positive number of minutes, got {minutes!r}"
            )
        if not 0 <= margin < 1 or not 0 <= min_fraction <= max_fraction <= 1:
            raise ValueError(
                f"need 0 <= margin < 1 and 0 <= min_fraction <= max_fraction <= 1, got margin={margin}, "
                f"min_fraction={min_fraction}, max_fraction={max_fraction}"
            )
        self.seconds = 60.0 * minutes
        self.clock, self.warmup_steps, self.min_steps = clock, warmup_steps, min_steps
        self.min_fraction, self.max_fraction, self.margin = min_fraction, max_fraction, margin
        self.steps_done, self.total = 0, None  # total: fixed once, by total_steps()
        self.eval_seconds = 0.0  # the slowest evaluation seen: a conservative cost per evaluation
        self._start: float | None = None
        self._mark = 0.0  # clock at the end of the previous step
        self._eval_since_mark = 0.0  # evaluation seconds since then: not step time
        self._window: list[float] = []  # seconds of each timed step (after the warm-up)

    def start(self) -> None:
        """Start the clock: call once, when the run starts (setup counts against the budget)."""
        self._start = self._mark = self.clock()

    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        if self._start is None:
            raise RuntimeError("TimeBudget.start() was not called")
        return self.clock() - self._start

    def seconds_left(self) -> float:
        """Seconds until the budget runs out (negative once over it), e.g. for a progress bar."""
        return self.seconds - self.elapsed()

    def record_step(self) -> None:
        """Call after each optimizer step, once its result is on the host (the loss's ``.item()``)."""
        now, self.steps_done = self.clock(), self.steps_done + 1
        if self.steps_done > self.warmup_steps:
            self._window.append(now - self._mark - self._eval_since_mark)
        self._mark, self._eval_since_mark = now, 0.0

    def record_eval(self, seconds: float) -> None:
        """Report an evaluation's duration: its cost per evaluation, kept out of the step time."""
        self.eval_seconds = max(self.eval_seconds, seconds)
        self._eval_since_mark += seconds

    @property
    def step_seconds(self) -> float:
        """Mean seconds per step over the later half of the timed window (all steps if it is empty).

        The first steps after the warm-up can still be slow (a loader worker filling its queue,
        pages of a pixel cache read for the first time); averaged in, 10 such steps made a
        5-minute run plan 500 steps where 770 fitted. The later half is the steady state.
        """
        if not self._window:
            return self.elapsed() / max(self.steps_done, 1)
        recent = self._window[len(self._window) // 2 :]  # the start-up transient is over by then
        return sum(recent) / len(recent)

    @property
    def calibrated(self) -> bool:
        """Whether enough has been measured to fix the step count (see the module docstring)."""
        spent = self.elapsed() / self.seconds
        enough = len(self._window) >= self.min_steps and spent >= self.min_fraction
        return self.total is not None or enough or spent >= self.max_fraction

    def estimate(self, eval_every: int | None = None, final_eval: bool = True) -> int:
        """The step count that fits by the measurements so far, without fixing it.

        Before calibration ends, a run lays its schedules over this provisional count, so
        that its first steps already follow (nearly) the schedule the fixed count will give.

        Args:
            eval_every: an evaluation after every ``eval_every``-th step before the last;
                ``None`` for none.
            final_eval: whether one more evaluation follows the last step.

        Returns:
            the largest count that fits the budget, at least ``steps_done + 1``.
        """
        done, now, step = self.steps_done, self.elapsed(), max(self.step_seconds, 1e-9)
        limit = (1 - self.margin) * self.seconds

        def cost(n: int) -> float:  # seconds the whole run takes if it ends after n steps
            periodic = (
                (n - 1) // eval_every - (done - 1) // eval_every if eval_every else 0
            )  # in [done, n)
            return now + (n - done) * step + (periodic + int(final_eval)) * self.eval_seconds

        lo = done + 1
        hi = max(
            lo, done + math.floor((limit - now) / step)
        )  # evaluations aside, nothing longer fits
        while lo < hi:  # largest n in [lo, hi] with cost(n) <= limit (cost grows with n), else lo
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= limit else (lo, mid - 1)
        return lo

    def total_steps(self, eval_every: int | None = None, final_eval: bool = True) -> int:
        """Fix (on the first call) and return the run's total number of optimizer steps.

        Args:
            eval_every: an evaluation after every ``eval_every``-th step before the last;
                ``None`` for none.
            final_eval: whether one more evaluation follows the last step.

        Returns:
            :meth:`estimate` at the first call; later calls return the same number whatever
            their arguments.
        """
        if self.total is not None:
            return self.total
        if not self.calibrated:
            raise RuntimeError(
                f"not calibrated yet ({len(self._window)} timed steps): keep calling record_step()"
            )
        self.total = self.estimate(eval_every, final_eval)
        return self.total


@dataclass(frozen=True)
class Decision:
    """What every rank agreed after a step.

    Attributes:
        last_step: where the run ends now: open-ended (``sys.maxsize``) while a time budget
            is still measuring, and never past ``cfg.max_steps``.
        settled: a time budget fixed the step count at this step.
        stop: ``"signal"`` (SIGTERM or Ctrl-C on some rank), ``"time"`` (the budget ran out
            before the last step) or ``None`` (go on).
    """

    last_step: int
    settled: bool = False
    stop: Literal["signal", "time"] | None = None


class Budget:
    """The run's step count and the decision every rank takes after each step.

    Rank 0 holds the :class:`TimeBudget`: it lays the schedules over the budget's estimate,
    fixes their length once it has measured enough, and sees the budget run out. A SIGTERM
    or Ctrl-C may reach any rank. One int64 all-reduce on the CPU group
    (:func:`~dino_nb.distributed.agree`) tells every rank all of it at the same step, so they
    all run the same schedules and leave the loop together.

    This is the one place that replaces ``run.schedules`` after
    :func:`~dino_nb.step.build_run` has laid them over ``cfg.epochs``.

    Args:
        run: the run whose schedules follow the step count.
        time_budget: rank 0's started budget; ``None`` on the other ranks and without ``--minutes``.
        saved: the checkpoint this run continues: a budget run keeps the step count it fixed.
    """

    def __init__(
        self, run: Run, time_budget: TimeBudget | None, saved: dict[str, Any] | None = None
    ) -> None:
        self.run = run
        self.fixed = run.cfg.minutes is None  # whether the schedules' length is final
        if saved is not None:
            saved_fixed = bool(saved.get("schedule_fixed", True))
            self.fixed = self.fixed or saved_fixed
            if saved_fixed and saved["config"].get("minutes") and "total_steps" in saved:
                # a run without a budget follows cfg.epochs, so a longer --epochs extends it
                self._lay(int(saved["total_steps"]))
        self.time_budget = None if self.fixed else time_budget
        self.last_step = self._last_step()

    def agree(self, step: int, signalled: bool) -> Decision:
        """After step ``step``: this rank's :meth:`proposal`, summed over ranks, :meth:`follow`-ed."""
        return self.follow(agree(self.proposal(step, signalled), self.run.info))

    def proposal(self, step: int, signalled: bool) -> list[int]:
        """What this rank knows: ``[signalled, out of time, planned step count, count fixed]``.

        Only rank 0 has a clock, so the others add zeros to its count and flags.
        """
        planned, out_of_time, budget = 0, False, self.time_budget
        if budget is not None:
            budget.record_step()
            planned = self._planned()
            out_of_time = self._out_of_time(step)
        fixed = budget is not None and budget.total is not None
        return [int(signalled), int(out_of_time), planned, int(fixed)]

    def follow(self, agreed: Sequence[int]) -> Decision:
        """Take the summed proposals: lay the schedules over the planned count, fix it, stop."""
        signalled, late, total, fixed = agreed
        settled = not self.fixed and bool(fixed)
        if not self.fixed and total and total != len(self.run.schedules):
            self._lay(total)
        self.fixed = self.fixed or settled
        self.last_step = self._last_step()
        return Decision(
            self.last_step, settled, "signal" if signalled else "time" if late else None
        )

    def record_eval(self, seconds: float) -> None:
        """An evaluation's duration, which the time budget plans for and keeps out of the step time."""
        if self.time_budget is not None:
            self.time_budget.record_eval(seconds)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run continues these schedules."""
        return {"total_steps": len(self.run.schedules), "schedule_fixed": self.fixed}

    def _lay(self, total: int) -> None:
        self.run.schedules = Schedules(self.run.cfg, total, self.run.global_batch)

    def _last_step(self) -> int:
        total = len(self.run.schedules) if self.fixed else sys.maxsize
        max_steps = self.run.cfg.max_steps
        return total if max_steps is None else min(total, max_steps)

    def _planned(self) -> int:
        """The step count the budget plans now (0 while it is still warming up)."""
        budget = self.time_budget
        assert budget is not None
        if budget.total is not None:
            return budget.total
        if budget.steps_done <= budget.warmup_steps:
            return 0
        eval_every = self.run.cfg.eval_every
        return budget.total_steps(eval_every) if budget.calibrated else budget.estimate(eval_every)

    def _out_of_time(self, step: int) -> bool:
        """Whether a fixed budget has only the final evaluation's time left, before the last step.

        The step count is fixed from the steps timed early; when the machine slows down later
        (other work starts), the budget still holds: the run stops here, with the schedules
        not finished, and says so.
        """
        budget = self.time_budget
        if budget is None or budget.total is None or step >= min(budget.total, self.last_step):
            return False
        if budget.seconds_left() > budget.eval_seconds:
            return False
        print(
            f"time budget reached at step {step} of {budget.total}: the steps got slower than "
            "measured at the start (is other work running?); stopping here",
            file=sys.stderr,
            flush=True,
        )
        return True
