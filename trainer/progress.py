"""What training shows while it runs: a progress line on a terminal, and the periodic progress log line.

The progress line (stderr, when it is a terminal) is redrawn in place after every train call with the step,
epoch, loss, speed, elapsed time and ETA. It is erased before any log record is written, so a log line never
starts on the same line as the progress line; the next call draws it again below. When stderr is not a
terminal (log files, pipes, horovodrun) nothing is drawn and the log lines report progress.
"""

from __future__ import annotations

import logging
import math
import sys
import time

_ERASE_LINE = "\r\x1b[K"  # carriage return, then erase to the end of the line (ANSI)


def _clock(seconds: float) -> str:
    """1:02:03, or 2:03 under an hour."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """The progress line of a run; a context manager that hooks into logging while it is active.

    Args:
      total_steps: the run's last step.
      steps_per_epoch: steps in one epoch (for the epoch count).
      start_step: the step the run starts (or resumes) at: the ETA extrapolates from the steps since then.
      stream: where to draw (default sys.stderr); drawn only if it is a terminal.
    """

    def __init__(self, total_steps: int, steps_per_epoch: int, start_step: int, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total_steps, self.start_step = total_steps, start_step
        self.epochs = max(1, math.ceil(total_steps / steps_per_epoch))
        self.started = time.monotonic()
        self._drawn = False
        self._handlers: list[logging.Handler] = []

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self._handlers = list(logging.getLogger().handlers)
            for handler in self._handlers:
                handler.addFilter(self._erase_before_record)
        return self

    def __exit__(self, *exc) -> None:
        self.erase()
        for handler in self._handlers:
            handler.removeFilter(self._erase_before_record)
        self._handlers = []

    def _erase_before_record(self, record: logging.LogRecord) -> bool:
        self.erase()
        return True  # a filter that lets every record through

    def erase(self) -> None:
        if self._drawn:
            self.stream.write(_ERASE_LINE)
            self.stream.flush()
            self._drawn = False

    def update(self, step: int, epoch: int, loss: float, examples_per_second: float) -> None:
        """Redraws the line after a call that ended at ``step`` in (0-based) ``epoch``."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        done = step - self.start_step
        eta = _clock(elapsed / done * (self.total_steps - step)) if done > 0 else "?"
        filled = int(30 * step / max(self.total_steps, 1))
        self.stream.write(f"{_ERASE_LINE}[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total_steps} "
                          f"epoch {epoch + 1}/{self.epochs} loss {loss:.4f} {examples_per_second:,.0f} ex/s "
                          f"{_clock(elapsed)} elapsed, ETA {eta}")
        self.stream.flush()
        self._drawn = True


class LogWindow:
    """Train statistics between two progress log lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum = self.examples = self.seconds = 0.0
        self.steps = 0

    def add(self, loss_sum: float, examples: float, steps: int, seconds: float) -> None:
        self.loss_sum += loss_sum
        self.examples += examples
        self.steps += steps
        self.seconds += seconds

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.examples, 1.0)

    @property
    def examples_per_second(self) -> float:
        return self.examples / max(self.seconds, 1e-9)

    @property
    def step_ms(self) -> float:
        return 1000.0 * self.seconds / max(self.steps, 1)
