"""The Labels dashboard's TensorBoard plugin: JSON routes over :class:`~.reader.LogdirReader` and the static
page.  Registered by the package's ``tensorboard_plugins`` entry point, so ``tensorboard --logdir DIR``
shows a "Labels" tab once multilabel-trainer is installed.

Routes (under ``data/plugin/mlt_labels/``):

* ``runs``: ``{"runs": [{"run", "steps", "num_labels"}]}`` for every run with a per-label table;
* ``table?run=R&step=S`` (default: the last step): every label's row at that evaluation, column-wise, with
  the head / torso / tail summary;
* ``label?run=R&label=NAME&step=S``: that label's values at every evaluation of the run and its PR curve
  at step S (when the run recorded one for it);
* ``static/<file>``: the page (``index.js`` is the ES module TensorBoard loads into the tab's iframe).
"""

from __future__ import annotations

import json
import os

import numpy as np
import werkzeug
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from trainer.labels_plugin import table as fmt
from trainer.labels_plugin.reader import LogdirReader, Run, Table
from trainer.metrics.compute import BUCKETS

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
_CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css"}
HISTORY_COLUMNS = ("pr_auc", "roc_auc", "f1", "precision", "recall", "pred_pos_rate", "prevalence", "threshold")


def _json_list(values: np.ndarray) -> list:
    """Numbers rounded to 6 decimals (float32 carries no more), NaN as null (JSON has no NaN)."""
    rounded = np.round(np.asarray(values, np.float64), 6)
    return [None if v != v else v for v in rounded.tolist()]


def _nanmean(x: np.ndarray):
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else None


def bucket_summary(table: Table) -> list[dict]:
    """Macro figures over all labels and per head / torso / tail bucket (buckets by training frequency,
    as computed when the table was written)."""
    bucket = table.column("bucket")
    counts = np.nan_to_num(table.column("train_count"))
    groups = [("all", np.ones(len(bucket), bool))]
    if not np.isnan(bucket).all():
        groups += [(name, bucket == code) for code, name in enumerate(BUCKETS)]
    rows = []
    for name, sel in groups:
        row = {"bucket": name, "labels": int(sel.sum()), "with_support": int((table.column("support")[sel] > 0).sum()),
               "train_share": float(counts[sel].sum() / counts.sum()) if counts.sum() > 0 else None}
        for metric in ("pr_auc", "roc_auc", "f1", "precision", "recall"):
            row[metric] = _nanmean(table.column(metric)[sel])
        rows.append(row)
    return rows


def table_json(run_name: str, run: Run, table: Table) -> dict:
    return {"run": run_name, "step": table.step, "steps": run.steps(), "wall_time": table.wall_time,
            "labels": table.labels, "columns": table.columns, "thresholds_tuned": table.thresholds_tuned,
            "values": {c: _json_list(table.values[:, j]) for j, c in enumerate(table.columns)},
            "buckets": bucket_summary(table)}


def label_json(run_name: str, run: Run, label: str, step: int) -> dict:
    """One label's history over the run's evaluations and its PR curve at ``step``."""
    steps = [s for s in run.steps() if label in run.tables[s].labels]
    if not steps:
        raise KeyError(f"run {run_name!r} has no label {label!r}")
    rows = np.stack([run.tables[s].values[run.tables[s].labels.index(label)] for s in steps])
    columns = run.tables[steps[-1]].columns
    out = {"run": run_name, "label": label, "steps": steps,
           "history": {c: _json_list(rows[:, columns.index(c)]) for c in HISTORY_COLUMNS if c in columns},
           "curve": None}
    curves, table = run.curves.get(step), run.tables.get(step)
    if curves is not None and table is not None:
        index = table.labels.index(label) if label in table.labels else -1
        if index in curves.label_indices:
            row = curves.values[curves.label_indices.index(index)].astype(np.float64)
            out["curve"] = {"step": step, "thresholds": curves.thresholds, "precision": _json_list(row[0]),
                            "recall": _json_list(row[1])}
    return out


class LabelsPlugin(base_plugin.TBPlugin):
    """The "Labels" tab: a table of every label, frequency scatter, label pages, run comparison."""

    plugin_name = fmt.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._reader = LogdirReader(context.logdir or "")

    def get_plugin_apps(self):
        return {"/static/*": self._serve_static, "/runs": self._serve_runs, "/table": self._serve_table,
                "/label": self._serve_label}

    def is_active(self) -> bool:
        return bool(self._reader.runs())

    def frontend_metadata(self):
        # TensorBoard's reload button does not reach an iframed plugin: the page has its own.
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js", tab_name="Labels", disable_reload=True)

    @wrappers.Request.application
    def _serve_static(self, request):
        name = request.path.rsplit("/static/", 1)[-1]
        if name not in os.listdir(STATIC_DIR) or os.path.splitext(name)[1] not in _CONTENT_TYPES:
            return http_util.Respond(request, "not found", "text/plain", code=404)
        with open(os.path.join(STATIC_DIR, name), encoding="utf-8") as f:
            return http_util.Respond(request, f.read(), _CONTENT_TYPES[os.path.splitext(name)[1]])

    @wrappers.Request.application
    def _serve_runs(self, request):
        runs = [{"run": name, "steps": run.steps(), "num_labels": len(run.tables[run.steps()[-1]].labels)}
                for name, run in sorted(self._reader.runs().items())]
        return self._respond(request, {"runs": runs})

    @wrappers.Request.application
    def _serve_table(self, request):
        name, run = self._run(request)
        step = self._step(request, run)
        return self._respond(request, table_json(name, run, run.tables[step]))

    @wrappers.Request.application
    def _serve_label(self, request):
        name, run = self._run(request)
        step = self._step(request, run)
        try:
            return self._respond(request, label_json(name, run, request.args.get("label", ""), step))
        except KeyError as e:
            return http_util.Respond(request, str(e), "text/plain", code=404)

    def _run(self, request) -> tuple[str, Run]:
        name = request.args.get("run", "")
        run = self._reader.runs().get(name)
        if run is None:
            raise werkzeug.exceptions.NotFound(f"no per-label table in run {name!r}")
        return name, run

    @staticmethod
    def _step(request, run: Run) -> int:
        text = request.args.get("step")
        step = run.steps()[-1] if not text else int(text) if text.lstrip("-").isdigit() else None
        if step not in run.tables:
            raise werkzeug.exceptions.NotFound(f"no evaluation at step {text!r}")
        return step

    @staticmethod
    def _respond(request, payload: dict):
        return http_util.Respond(request, json.dumps(payload, separators=(",", ":")), "application/json")
