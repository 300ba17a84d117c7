"""The Labels plugin's Python side: its event-file reader and JSON routes, on summaries written by the real
SummaryWriters (the browser side is tests/test_labels_dashboard_browser.py)."""

import json

import numpy as np
import pytest
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from test_summaries import make_result
from trainer.labels_plugin import table as fmt
from trainer.labels_plugin.plugin import LabelsPlugin, bucket_summary
from trainer.labels_plugin.reader import LogdirReader
from trainer.summaries import SummaryWriters

L = 50


@pytest.fixture(scope="module")
def results():
    first = make_result(seed=0)
    return [first] + [make_result(seed=s, names=first.label_names) for s in (1, 2)]


def test_reader_follows_files_and_runs(tmp_path, results):
    reader = LogdirReader(str(tmp_path), min_interval=0)
    assert reader.runs() == {}
    w = SummaryWriters(str(tmp_path / "model" / "logs"))
    w.eval_results(10, results[0])
    w.eval_results(20, results[1])
    w.scalars("train", 20, {"loss": 1.0})
    runs = reader.runs()
    assert list(runs) == ["model/logs/eval"] and runs["model/logs/eval"].steps() == [10, 20]
    w.close()
    # A resumed run: a new writer, so a new event file that describes its tags anew; and a test split.
    w = SummaryWriters(str(tmp_path / "model" / "logs"))
    w.eval_results(30, results[2])
    w.eval_results(30, results[0], run="test")
    w.close()
    runs = reader.runs()
    assert sorted(runs) == ["model/logs/eval", "model/logs/test"]
    run = runs["model/logs/eval"]
    assert run.steps() == [10, 20, 30] and sorted(run.curves) == [10, 20, 30]
    for step, res in zip((10, 20, 30), results):
        table = run.tables[step]
        assert table.labels == res.label_names and table.columns == list(fmt.COLUMNS)
        np.testing.assert_allclose(table.column("pr_auc"), res.per_label["pr_auc"], rtol=1e-6)
        np.testing.assert_allclose(table.column("train_count"), res.per_label["train_count"])
    assert not run.tables[10].thresholds_tuned


def test_reader_throttles_reloads(tmp_path, results):
    reader = LogdirReader(str(tmp_path), min_interval=3600)
    with SummaryWriters(str(tmp_path)) as w:
        w.eval_results(1, results[0])
        assert list(reader.runs()["eval"].tables) == [1]
        w.eval_results(2, results[1])
        w.flush()
        assert list(reader.runs()["eval"].tables) == [1]  # not reloaded within min_interval


def test_bucket_summary_matches_compute(tmp_path, results):
    with SummaryWriters(str(tmp_path)) as w:
        w.eval_results(1, results[0])
    table = LogdirReader(str(tmp_path)).runs()["eval"].tables[1]
    rows = {r["bucket"]: r for r in bucket_summary(table)}
    agg = results[0].aggregates
    assert list(rows) == ["all", "head", "torso", "tail"]
    assert rows["all"]["labels"] == L and rows["all"]["pr_auc"] == pytest.approx(agg["macro_pr_auc"], rel=1e-5)
    assert rows["all"]["with_support"] == agg["num_labels_with_support"]
    for b in ("head", "torso", "tail"):
        assert rows[b]["labels"] == agg[f"bucket/{b}/num_labels"]
        assert rows[b]["pr_auc"] == pytest.approx(agg[f"bucket/{b}/macro_pr_auc"], rel=1e-5)
        assert rows[b]["f1"] == pytest.approx(agg[f"bucket/{b}/macro_f1"], rel=1e-5)
    assert sum(rows[b]["train_share"] for b in ("head", "torso", "tail")) == pytest.approx(1.0)


def _client(logdir) -> Client:
    plugin = LabelsPlugin(base_plugin.TBContext(logdir=str(logdir)))
    apps = plugin.get_plugin_apps()

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        route = "/static/*" if path.startswith("/static/") else path
        return apps[route](environ, start_response)

    assert plugin.frontend_metadata().es_module_path == "/static/index.js"
    assert plugin.frontend_metadata().tab_name == "Labels"
    return Client(app)


def test_routes(tmp_path, results):
    client = _client(tmp_path)
    assert json.loads(client.get("/runs").data) == {"runs": []}
    with SummaryWriters(str(tmp_path)) as w:
        for step, res in zip((5, 10, 15), results):
            w.eval_results(step, res)
    client = _client(tmp_path)  # a fresh plugin: the first reload reads everything
    assert json.loads(client.get("/runs").data) == {"runs": [{"run": "eval", "steps": [5, 10, 15], "num_labels": L}]}

    table = json.loads(client.get("/table?run=eval").data)
    assert table["step"] == 15 and table["labels"] == results[2].label_names
    nan = np.isnan(results[2].per_label["roc_auc"])
    assert [v is None for v in table["values"]["roc_auc"]] == nan.tolist()  # NaN travels as null
    np.testing.assert_allclose(np.array(table["values"]["roc_auc"], float)[~nan], results[2].per_label["roc_auc"][~nan],
                               atol=1e-6)
    assert json.loads(client.get("/table?run=eval&step=5").data)["step"] == 5

    name = results[0].label_names[3]
    label = json.loads(client.get("/label", query_string={"run": "eval", "label": name, "step": 10}).data)
    assert label["steps"] == [5, 10, 15]
    np.testing.assert_allclose(label["history"]["pr_auc"], [r.per_label["pr_auc"][3] for r in results], atol=1e-6)
    thresholds, curves = fmt.curve_points(results[1].pos_hist[3:4], results[1].neg_hist[3:4])
    assert label["curve"]["step"] == 10 and label["curve"]["thresholds"] == pytest.approx(thresholds.tolist())
    np.testing.assert_allclose(label["curve"]["recall"], curves[0, 1], atol=1e-3)

    assert client.get("/table?run=nope").status_code == 404
    assert client.get("/table?run=eval&step=7").status_code == 404
    assert client.get("/label?run=eval&label=nope").status_code == 404
    index = client.get("/static/index.js")
    assert index.status_code == 200 and b"export async function render" in index.data
    assert index.headers["Content-Type"].startswith("text/javascript")
    assert client.get("/static/../plugin.py").status_code == 404


def test_entry_point_registered():
    """The package registers the plugin for TensorBoard (needs `pip install -e .` of this checkout: CI does it)."""
    import importlib.metadata
    import os

    points = [e for e in importlib.metadata.entry_points(group="tensorboard_plugins") if e.name == fmt.PLUGIN_NAME]
    if not points and os.environ.get("CI", "").lower() != "true":
        pytest.skip("the installed multilabel-trainer predates the Labels plugin: pip install -e . registers it")
    assert len(points) == 1 and points[0].load() is LabelsPlugin
