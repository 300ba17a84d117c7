"""Loads every per-label table and curve summary of a logdir, incrementally.

TensorBoard's own multiplexer keeps a sample of 10 values per tag for plugins it does not know, and the
dashboard needs every evaluation (a label's history), so the plugin reads the event files itself: each
run directory under the logdir (named as TensorBoard names runs: its path relative to the logdir), each
event file in name order, each file from where the last reload stopped.  Only ``mlt_labels`` values are
decoded; the rest of an event is skipped after protobuf parsing.

Memory: every evaluation's table is kept, ``4 * labels * 11`` bytes each (2.2 MB at 50,000 labels), plus
its curves (at most 204 kB).  A later value for the same run and step (``trainer evaluate`` run twice)
replaces the earlier one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import numpy as np
from tensorboard.backend.event_processing import event_file_loader, io_wrapper
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

from trainer.labels_plugin import table as fmt

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Table:
    """One evaluation's table: ``values[label, column]`` with ``columns`` and ``labels`` names."""

    step: int
    wall_time: float
    values: np.ndarray
    columns: list[str]
    labels: list[str]

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.columns.index(name)]

    @property
    def thresholds_tuned(self) -> bool:
        return bool(np.any(self.column("threshold") != 0.5))


@dataclasses.dataclass
class Curves:
    """One evaluation's PR curves: ``values[i, 0|1, t]`` precision / recall of label ``label_indices[i]``."""

    thresholds: list[float]
    label_indices: list[int]
    values: np.ndarray


@dataclasses.dataclass
class Run:
    tables: dict[int, Table] = dataclasses.field(default_factory=dict)
    curves: dict[int, Curves] = dataclasses.field(default_factory=dict)

    def steps(self) -> list[int]:
        return sorted(self.tables)


class _FileState:
    """An event file being followed: its loader and the last full description of each tag in it."""

    def __init__(self, path: str):
        self.path = path
        self.loader = event_file_loader.RawEventFileLoader(path)
        self.described: dict[str, dict] = {}


class LogdirReader:
    """The ``mlt_labels`` summaries under a logdir, reloaded at most every ``min_interval`` seconds.

    Args:
      logdir: TensorBoard's logdir (local path or any scheme TensorBoard's gfile reads).
      min_interval: seconds between two scans of the logdir.
    """

    def __init__(self, logdir: str, min_interval: float = 2.0):
        self.logdir = logdir
        self.min_interval = min_interval
        self._runs: dict[str, Run] = {}
        self._files: dict[str, _FileState] = {}
        self._lock = threading.Lock()
        self._last_reload = -np.inf

    def runs(self) -> dict[str, Run]:
        """Run name -> :class:`Run`, for runs with at least one table (after a reload if one is due)."""
        with self._lock:
            if time.monotonic() - self._last_reload >= self.min_interval:
                self._reload()
                self._last_reload = time.monotonic()
            return {name: run for name, run in self._runs.items() if run.tables}

    def _reload(self) -> None:
        if not self.logdir:
            return
        for directory in sorted(io_wrapper.GetLogdirSubdirectories(self.logdir)):
            name = os.path.relpath(directory, self.logdir).replace(os.sep, "/")
            paths = sorted(p for p in io_wrapper.ListDirectoryAbsolute(directory) if io_wrapper.IsSummaryEventsFile(p))
            for path in paths:
                if path not in self._files:
                    self._files[path] = _FileState(path)
                self._load_file(self._runs.setdefault(name, Run()), self._files[path])

    def _load_file(self, run: Run, state: _FileState) -> None:
        for record in state.loader.Load():
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != fmt.PLUGIN_NAME:
                    continue
                try:
                    self._add_value(run, state, event, value)
                except ValueError as e:
                    log.warning("%s: step %d, tag %s skipped: %s", state.path, event.step, value.tag, e)

    @staticmethod
    def _add_value(run: Run, state: _FileState, event, value) -> None:
        content = fmt.parse_content(value.metadata)
        if len(content) > 1:
            state.described[value.tag] = content
        described = state.described.get(value.tag)
        if described is None:
            raise ValueError("no description earlier in this file (truncated file?)")
        array = tensor_util.make_ndarray(value.tensor)
        if value.tag == fmt.TABLE_TAG:
            if array.shape != (len(described["labels"]), len(described["columns"])):
                raise ValueError(f"table of shape {array.shape} does not match its description")
            run.tables[event.step] = Table(event.step, event.wall_time, array.astype(np.float32),
                                           described["columns"], described["labels"])
        elif value.tag == fmt.CURVES_TAG:
            run.curves[event.step] = Curves(described["thresholds"], described["label_indices"], array)
