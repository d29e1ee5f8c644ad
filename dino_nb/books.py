"""A wall-time budget (``--minutes N``): how many optimizer steps fit, evaluations included.

Every schedule of the recipe (lr warmup + cosine, weight decay, teacher momentum, teacher
temperature warmup, last-layer freeze) is a function of the total step count, so a budget
in minutes must become a step count *once*, early, and then never move: a count that kept
changing would stretch the cosine under a running optimizer. The rule:

1. **Warm-up steps** (the first 3): compilation, cuDNN autotuning and the data loader's
   first batches make them slow; they count in the elapsed time but not in the step time.
2. **Calibration**: the next steps are timed until there are at least ``min_steps`` of them
   *and* ``min_fraction`` of the budget has passed (one noisy step cannot decide the run),
   or until ``max_fraction`` has passed (a slow model on a short budget must decide anyway).
   The later half of the timed steps gives the step time: the first ones can still be slow.
3. **Fix** the largest count ``N`` with
   ``elapsed + (N - done) * step_seconds + evals(N) * eval_seconds <= (1 - margin) * budget``,
   where ``evals(N)`` counts the evaluations still to come (every ``eval_every`` steps before
   the last, plus the final one). The margin absorbs step-time jitter and the last checkpoint.

Use: ``start()`` when the run starts; ``record_step()`` after each step; ``record_eval(s)``
after each evaluation; once ``calibrated``, ``total_steps(eval_every=E)`` sizes the schedules.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TimeBudget:
    """Turns ``minutes`` into a fixed step count after a short calibration phase.

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
