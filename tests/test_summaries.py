"""TensorBoard summaries: write, read the event files back with TensorBoard's reader, check tags and values."""

import glob
import json
import os

import numpy as np
import pytest
from sklearn import metrics as skm
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from trainer.labels_plugin import table as fmt
from trainer.metrics import bins, compute
from trainer.metrics.state import accumulate, batch_metric_state, zero_state
from trainer.summaries import (CONSTANT_AGGREGATES, LOSS_TAG, PER_LABEL_SCALARS, PR_CURVE_LABELS_FILE,
                               PR_CURVE_THRESHOLDS, PerLabelOptions, SummaryWriters, choose_pr_curve_labels,
                               pr_curve_data, sanitize_tag_names)

L, BINS = 50, 100


def make_result(num_labels=L, num_examples=400, seed=0, thresholds=None, names=None):
    """A real evaluation result: random labels and scores through the metric state and compute_metrics."""
    rng = np.random.default_rng(seed)
    y = (rng.random((num_examples, num_labels)) < rng.uniform(0.02, 0.4, num_labels)).astype(np.float32)
    y[:, 7] = 0  # no positives: NaN AUCs
    p = np.clip(0.3 * y + 0.7 * rng.random((num_examples, num_labels)), 0, 1).astype(np.float32)
    thresholds = np.full(num_labels, 0.5) if thresholds is None else thresholds
    st = zero_state(num_labels, BINS)
    for i in range(0, num_examples, 100):
        st = accumulate(st, batch_metric_state(y[i:i + 100], p[i:i + 100], thresholds, BINS))
    names = names or [f"topic/{i} name" for i in range(num_labels)]
    return compute.compute_metrics({k: np.asarray(v) for k, v in st.items()}, names, thresholds,
                                   train_label_counts=10 * y.sum(0) + np.arange(num_labels))


@pytest.fixture(scope="module")
def result():
    names = [f"topic/{i} name" for i in range(L)]
    names[10], names[11] = "x/y", "x_y"  # collide after sanitising
    return make_result(names=names)


def load(path):
    acc = ea.EventAccumulator(str(path), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return acc


def value(acc, tag, index=-1):
    return tensor_util.make_ndarray(acc.Tensors(tag)[index].tensor_proto)


def test_sanitize_tag_names():
    tags = sanitize_tag_names(["a/b c", "a_b_c", "ok.name-1", "", "日本"])
    assert tags == ["a_b_c_0", "a_b_c_1", "ok.name-1", "_", "日本"]
    assert len(set(sanitize_tag_names(["x/y", "x_y", "x y"]))) == 3


def test_eval_results_tags_and_values(tmp_path, result):
    with SummaryWriters(tmp_path, enabled=True, per_label=PerLabelOptions(min_support=20)) as w:
        w.eval_results(3, result, loss=0.25)
    acc = load(tmp_path / "eval")
    tags = set(acc.Tags()["tensors"])

    for name, v in result.aggregates.items():
        constant = name in CONSTANT_AGGREGATES or name.endswith("/num_labels")
        assert (f"metrics/{name}" in tags) == (not constant and np.isfinite(v)), name
        if f"metrics/{name}" in tags:
            assert value(acc, f"metrics/{name}") == pytest.approx(v, rel=1e-6), name
    assert acc.Tensors("metrics/micro_f1")[-1].step == 3 and value(acc, LOSS_TAG) == pytest.approx(0.25)
    assert not [t for t in tags if t.startswith("per_label/")]  # per-label scalars are off by default

    for metric in ("pr_auc", "roc_auc", "f1"):
        tag = f"across_labels/{metric}"
        assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "histograms"
        assert value(acc, tag)[:, 2].sum() == np.sum(~np.isnan(result.per_label[metric]))  # NaN left out

    # PR curves: 10 fixed labels spread over the training-frequency ranking, saved for later evaluations.
    pl = result.per_label
    saved = json.loads((tmp_path / PR_CURVE_LABELS_FILE).read_text())
    chosen = choose_pr_curve_labels(result, min_support=20)
    assert saved == [result.label_names[i] for i in chosen] and len(chosen) == 10
    assert np.all(pl["support"][chosen] >= 20)
    counts = pl["train_count"][chosen]
    assert counts[0] == pl["train_count"][pl["support"] >= 20].max() and np.all(np.diff(counts) <= 0)
    label_tags = sanitize_tag_names(result.label_names)
    assert set(acc.PluginTagToContent("pr_curves")) == {f"pr_curve/{label_tags[i]}" for i in chosen}
    data = value(acc, f"pr_curve/{label_tags[chosen[0]]}")
    assert data.shape == (6, PR_CURVE_THRESHOLDS) and data[0, 0] == pl["support"][chosen[0]]  # tp at threshold 0

    for tag, order in (("worst_labels", 1), ("best_labels", -1)):
        assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "text"
        text = value(acc, tag).item().decode()
        rows = [line for line in text.splitlines() if line.startswith("| ") and "label |" not in line]
        eligible = np.flatnonzero((pl["support"] >= 20) & ~np.isnan(pl["pr_auc"]))
        expected = eligible[np.argsort(order * pl["pr_auc"][eligible], kind="stable")][:10]
        assert [r.split(" | ")[0][2:] for r in rows] == [result.label_names[i] for i in expected]
        first = expected[0]
        assert f"| {pl['train_count'][first]:.0f} | {pl['support'][first]:.0f} |" in rows[0]
        assert rows[0].endswith(f"| {pl['threshold'][first]:.3f} |")
        assert "at least 20 positives" in text and "0.5 thresholds" in text


def test_label_table_summary(tmp_path, result):
    """labels/table holds every label's row; the label names are written once per event file."""
    second = make_result(seed=1, names=result.label_names)
    with SummaryWriters(tmp_path) as w:
        w.eval_results(10, result)
        w.eval_results(20, second)
    acc = load(tmp_path / "eval")
    assert acc.SummaryMetadata(fmt.TABLE_TAG).plugin_data.plugin_name == fmt.PLUGIN_NAME
    described = fmt.parse_content(acc.SummaryMetadata(fmt.TABLE_TAG))
    assert described["labels"] == result.label_names and described["columns"] == list(fmt.COLUMNS)
    events = acc.Tensors(fmt.TABLE_TAG)
    assert [e.step for e in events] == [10, 20]
    for index, res in ((0, result), (1, second)):
        table = value(acc, fmt.TABLE_TAG, index)
        assert table.shape == (L, len(fmt.COLUMNS)) and table.dtype == np.float32
        for c, name in enumerate(fmt.COLUMNS):
            if name == "prevalence":
                expected = res.per_label["support"] / res.aggregates["num_examples"]
            elif name == "bucket":
                expected = np.array([compute.BUCKETS.index(b) for b in res.buckets], float)
            else:
                expected = res.per_label[name]
            np.testing.assert_allclose(table[:, c], expected, rtol=1e-6, err_msg=name)  # NaN == NaN here
    # The second value of the file carries {"version": 1} only (raw events: the accumulator keeps the first).
    files = glob.glob(str(tmp_path / "eval" / "events.out.tfevents.*"))
    contents = [fmt.parse_content(v.metadata) for e in event_file_loader.EventFileLoader(files[0]).Load()
                for v in e.summary.value if v.tag == fmt.TABLE_TAG]
    assert len(contents) == 2 and "labels" in contents[0] and contents[1] == {"version": 1}

    curves = value(acc, fmt.CURVES_TAG)
    meta = fmt.parse_content(acc.SummaryMetadata(fmt.CURVES_TAG))
    assert curves.dtype == np.float16 and curves.shape == (L, 2, len(meta["thresholds"]))
    assert meta["label_indices"] == list(range(L)) and meta["thresholds"][0] == 0 and meta["thresholds"][-1] == 1
    # Bin edges, about evenly spaced in log-odds, and each label's precision / recall at them.
    edges = bins.bin_edges(BINS)
    assert set(meta["thresholds"]) <= set(edges) and len(meta["thresholds"]) == fmt.CURVE_THRESHOLDS
    column = np.searchsorted(edges, meta["thresholds"])
    tp, fp = (bins.counts_at_edges(h[3])[column] for h in (second.pos_hist, second.neg_hist))
    np.testing.assert_allclose(curves[3, 1], tp / second.per_label["support"][3], atol=1e-3)  # recall
    predicted = tp + fp > 0
    np.testing.assert_allclose(curves[3, 0][predicted], tp[predicted] / (tp + fp)[predicted], atol=1e-3)  # precision
    assert np.isnan(curves[3, 0][~predicted]).all()


def test_table_size_at_50000_labels(tmp_path):
    """Bytes per evaluation stay bounded: the table, at most MAX_CURVE_LABELS curves, names once per file."""
    num_labels, bins = 50_000, 20
    rng = np.random.default_rng(0)
    pos = rng.poisson(0.05, (num_labels, bins)).astype(float)
    neg = rng.poisson(20.0, (num_labels, bins)).astype(float)
    state = {**zero_state(num_labels, bins),
             "pos_hist": pos, "neg_hist": neg, "tp": pos[:, 10:].sum(1), "fp": neg[:, 10:].sum(1),
             "fn": pos[:, :10].sum(1), "support": pos.sum(1), "pred_pos": (pos + neg)[:, 10:].sum(1),
             "num_examples": 4000.0, "lrap_count": 1.0}
    res = compute.compute_metrics(state, [f"tag_{i:05d}" for i in range(num_labels)], 0.5,
                                  train_label_counts=rng.zipf(1.5, num_labels))
    sizes = []
    with SummaryWriters(tmp_path) as w:
        for step in (1, 2):
            w.eval_results(step, res)
            w.flush()
            sizes.append(sum(os.path.getsize(f) for f in glob.glob(str(tmp_path / "eval" / "*"))))
    table_bytes = 4 * num_labels * len(fmt.COLUMNS)
    curve_bytes = 2 * 2 * (bins + 1) * fmt.MAX_CURVE_LABELS  # float16 precision and recall at the 21 bin edges
    second = sizes[1] - sizes[0]
    assert table_bytes + curve_bytes < second < table_bytes + curve_bytes + 100_000, sizes
    assert sizes[0] - second > 500_000  # the first one also carries the 50,000 names
    acc = load(tmp_path / "eval")
    meta = fmt.parse_content(acc.SummaryMetadata(fmt.CURVES_TAG))
    fixed = [res.label_names.index(n) for n in json.loads((tmp_path / PR_CURVE_LABELS_FILE).read_text())]
    assert len(meta["label_indices"]) == fmt.MAX_CURVE_LABELS and set(fixed) <= set(meta["label_indices"])


def test_pr_curve_labels_survive_a_new_writer(tmp_path, result):
    """A resumed run (a new SummaryWriters on the same logdir) draws the labels chosen at the first evaluation."""
    with SummaryWriters(tmp_path) as w:
        w.eval_results(1, result)
    first = set(load(tmp_path / "eval").PluginTagToContent("pr_curves"))
    later = make_result(seed=5, names=result.label_names)  # other supports: another choice if made anew
    assert choose_pr_curve_labels(later, min_support=10) != choose_pr_curve_labels(result, min_support=10)
    with SummaryWriters(tmp_path) as w:
        w.eval_results(2, later, run="test")
    assert set(load(tmp_path / "test").PluginTagToContent("pr_curves")) == first


def test_pr_curve_labels_explicit(tmp_path, result):
    w = SummaryWriters(tmp_path, per_label=PerLabelOptions(pr_curve_labels=["x/y", "topic/3 name"]))
    w.eval_results(1, result)
    w.close()
    assert set(load(tmp_path / "eval").PluginTagToContent("pr_curves")) == {"pr_curve/x_y_10", "pr_curve/topic_3_name"}
    assert not (tmp_path / PR_CURVE_LABELS_FILE).exists()
    with pytest.raises(ValueError, match="metrics.pr_curve_labels.*nope"):
        SummaryWriters(tmp_path, per_label=PerLabelOptions(pr_curve_labels=["nope"])).eval_results(1, result)


def test_per_label_scalars_option_and_tuned_thresholds(tmp_path):
    thresholds = np.linspace(0.2, 0.7, L)
    res = make_result(thresholds=thresholds)
    with SummaryWriters(tmp_path, per_label=PerLabelOptions(scalars=True)) as w:
        w.eval_results(4, res, run="test")
    acc = load(tmp_path / "test")
    tags = set(acc.Tags()["tensors"])
    label_tags = sanitize_tag_names(res.label_names)
    for metric in PER_LABEL_SCALARS:
        for i, tag in enumerate(label_tags):
            full = f"per_label/{metric}/{tag}"
            assert (full in tags) == (not np.isnan(res.per_label[metric][i])), full
            if full in tags:
                assert value(acc, full) == pytest.approx(res.per_label[metric][i], rel=1e-6)
    assert not [t for t in tags if t.startswith("per_label/support/")]
    # Threshold-dependent aggregates are marked; threshold-free ones are not.
    assert "metrics/micro_f1_at_tuned_thresholds" in tags and "metrics/micro_f1" not in tags
    assert "metrics/bucket/tail/macro_f1_at_tuned_thresholds" in tags
    assert "metrics/macro_pr_auc" in tags and "metrics/precision@1" in tags
    assert "the tuned thresholds" in value(acc, "worst_labels").item().decode()


def test_per_label_disabled_writes_aggregates_only(tmp_path, result):
    with SummaryWriters(tmp_path, per_label=PerLabelOptions(enabled=False)) as w:
        w.eval_results(1, result)
    tags = load(tmp_path / "eval").Tags()["tensors"]
    assert tags and all(t.startswith("metrics/") for t in tags)


def sklearn_precision_recall_at(y, p, thresholds):
    """Precision and recall of ``p >= t`` for each t, read off sklearn's precision_recall_curve (NaN precision
    where nothing is predicted)."""
    precision, recall, at = skm.precision_recall_curve(y, p)
    i = np.searchsorted(at, thresholds, side="left")  # the lowest score >= t gives the curve's point for t
    beyond = i == len(at)
    i = np.minimum(i, len(at) - 1)
    return np.where(beyond, np.nan, precision[i]), np.where(beyond, 0.0, recall[i])


CURVE_BINS = 200  # metrics.num_bins: 0.25, 0.5, 0.75 are bin edges then


def scores_for_curves():
    rng = np.random.default_rng(9)
    y = (rng.random((3000, 2)) < [0.01, 0.3]).astype(np.float32)
    logits = np.array([-6.0, -0.5]) + np.array([3.0, 2.0]) * y + rng.normal(0, 1.2, y.shape)
    p = (1 / (1 + np.exp(-logits))).astype(np.float32)
    st = accumulate(zero_state(2, CURVE_BINS), batch_metric_state(y, p, np.full(2, 0.5), CURVE_BINS))
    return y, p, st


def test_pr_curve_data_is_sklearns_curve_at_its_thresholds():
    """The pr_curves plugin's data at its evenly spaced thresholds: exact (as sklearn's precision_recall_curve
    gives) where a threshold is a bin edge, and between the exact values at the two enclosing edges elsewhere."""
    y, p, st = scores_for_curves()
    grid = np.linspace(0, 1, PR_CURVE_THRESHOLDS)
    edges = bins.bin_edges(CURVE_BINS)
    is_edge = np.isin(grid, edges)
    assert is_edge.sum() >= 5  # 0, 0.25, 0.5, 0.75, 1 at least
    upper = np.searchsorted(edges, grid, side="left")  # the bin edges enclosing each grid threshold
    lower = np.maximum(upper - 1, 0)
    for j in range(2):
        data = pr_curve_data(st["pos_hist"][j], st["neg_hist"][j])
        assert data.shape == (6, PR_CURVE_THRESHOLDS)
        tp, fp, tn, fn, precision, recall = data
        np.testing.assert_allclose(tp + fn, y[:, j].sum(), rtol=1e-6)
        np.testing.assert_allclose(fp + tn, (1 - y[:, j]).sum(), rtol=1e-6)
        for counts, of_class in ((tp, y[:, j] > 0), (fp, y[:, j] == 0)):
            def exact(thresholds):
                return np.array([np.sum((p[:, j] >= t) & of_class) for t in thresholds])
            np.testing.assert_array_equal(counts[is_edge], exact(grid[is_edge]))
            assert np.all((exact(edges[upper]) <= counts + 1e-4) & (counts <= exact(edges[lower]) + 1e-4))
        sk_precision, sk_recall = sklearn_precision_recall_at(y[:, j], p[:, j], grid)
        np.testing.assert_allclose(recall[is_edge], sk_recall[is_edge], atol=1e-6)
        shown = is_edge & ~np.isnan(sk_precision)
        np.testing.assert_allclose(precision[shown], sk_precision[shown], atol=1e-6)


def test_dashboard_curves_are_sklearns_curve_at_bin_edges():
    y, p, st = scores_for_curves()
    thresholds, curves = fmt.curve_points(st["pos_hist"], st["neg_hist"])
    assert thresholds[0] == 0 and thresholds[-1] == 1 and len(thresholds) == fmt.CURVE_THRESHOLDS
    assert set(thresholds) <= set(bins.bin_edges(CURVE_BINS))
    for j in range(2):
        precision, recall = sklearn_precision_recall_at(y[:, j], p[:, j], thresholds)
        np.testing.assert_allclose(curves[j, 1], recall, atol=1e-6)
        np.testing.assert_allclose(curves[j, 0], precision, atol=1e-6)  # NaN where nothing is predicted
    # The rare label's curve has points all along its scores (which lie below 0.05), not only at 0.
    rare = (thresholds > p[:, 0].min()) & (thresholds < p[y[:, 0] > 0, 0].max())
    assert rare.sum() >= 10


def test_train_progress_scalars_and_hparams(tmp_path):
    w = SummaryWriters(tmp_path, enabled=True)
    w.train_progress(5, {"loss": np.float32(0.25), "learning_rate": 1e-3, "bad": float("nan")})
    w.hparams({"checkpoint.keep": 3, "optimizer.learning_rate": 1e-3, "model.hidden": [64, 64], "model.ensemble": 1,
               "data.validation_fraction": 0.1, "loss.label_weights": None, "metrics.pr_curve_labels": ["a"],
               "train.bn": True, "layers": np.int64(2)},
              {"micro_f1": 0.5, "precision@1": 0.75, "num_examples": 100.0}, step=9)
    with pytest.raises(ValueError, match="summary run"):
        w.scalars("a/b", 1, {"a": 1.0})
    w.close()
    train = load(tmp_path / "train")
    assert value(train, LOSS_TAG) == pytest.approx(0.25) and train.Tensors(LOSS_TAG)[0].step == 5
    assert set(train.Tags()["tensors"]) == {LOSS_TAG, "train/learning_rate"}

    root = load(tmp_path)
    content = root.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in exp.metric_infos] == ["final/precision@1", "final/micro_f1"]  # constants left out
    names = [h.name for h in exp.hparam_infos]
    # TensorBoard sorts hparams by name: the rank prefix puts model, optimizer, data first.
    assert sorted(names)[:4] == ["1.model.ensemble", "1.model.hidden", "2.optimizer.learning_rate",
                                 "3.data.validation_fraction"]
    assert sorted(names)[-1] == "7.layers" and sorted(names)[-2] == "7.checkpoint.keep"
    assert {h.name: h.display_name for h in exp.hparam_infos}["1.model.hidden"] == "model.hidden"
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["1.model.hidden"].string_value == "64, 64"
    assert start.hparams["6.metrics.pr_curve_labels"].string_value == "a"
    assert start.hparams["4.loss.label_weights"].string_value == "none"
    assert start.hparams["7.layers"].number_value == 2 and start.hparams["5.train.bn"].bool_value
    assert value(root, "final/precision@1") == pytest.approx(0.75) and root.Tensors("final/precision@1")[0].step == 9


def test_disabled_writes_nothing(tmp_path, result):
    logdir = tmp_path / "logs"
    w = SummaryWriters(logdir, enabled=False)
    w.train_progress(1, {"loss": 1.0})
    w.eval_results(1, result)
    w.hparams({"lr": 0.1}, {"micro_f1": 0.1})
    w.flush()
    w.close()
    assert not logdir.exists()
    assert os.listdir(tmp_path) == []


def test_training_run_summaries(trained_run):
    """A real training run: grouped train tags, one table per evaluation, no constant series, hparams at the end."""
    logs = os.path.join(trained_run.model_dir, "logs")
    train = load(os.path.join(logs, "train"))
    assert LOSS_TAG in train.Tags()["tensors"] and "train/learning_rate" in train.Tags()["tensors"]
    assert all(t == LOSS_TAG or t.startswith("train/") for t in train.Tags()["tensors"])
    evals = load(os.path.join(logs, "eval"))
    tags = evals.Tags()["tensors"]
    steps = [e.step for e in evals.Tensors(fmt.TABLE_TAG)]
    assert len(steps) >= 4 and steps[-1] == trained_run.result.step  # every epoch's evaluation and the final one
    assert [e.step for e in evals.Tensors(LOSS_TAG)] == steps
    assert "metrics/num_examples" not in tags and "metrics/macro_pr_auc" in tags and "across_labels/pr_auc" in tags
    root = load(logs)
    assert {e.step for t in root.Tags()["tensors"] if t.startswith("final/") for e in root.Tensors(t)} == {steps[-1]}
