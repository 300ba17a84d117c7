"""TensorBoard summaries: write, read the event files back, check tags and values."""

import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from trainer.metrics import compute
from trainer.metrics.state import accumulate, batch_metric_state, zero_state
from trainer.summaries import PER_LABEL_METRICS, SummaryWriters, pr_curve_data, sanitize_tag_names

L, BINS = 50, 100


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    y = (rng.random((400, L)) < rng.uniform(0.02, 0.4, L)).astype(np.float32)
    y[:, 7] = 0  # no positives: NaN AUCs, not written
    p = np.clip(0.3 * y + 0.7 * rng.random((400, L)), 0, 1).astype(np.float32)
    st = zero_state(L, BINS)
    for i in range(0, 400, 100):
        st = accumulate(st, batch_metric_state(y[i:i + 100], p[i:i + 100], np.full(L, 0.5), BINS))
    names = [f"topic/{i} name" for i in range(L)]
    names[10], names[11] = "x/y", "x_y"  # collide after sanitising
    return compute.compute_metrics(st, names, np.full(L, 0.5), train_label_counts=y.sum(0) + 1)


def load(path):
    acc = ea.EventAccumulator(str(path), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return acc


def value(acc, tag):
    return tensor_util.make_ndarray(acc.Tensors(tag)[-1].tensor_proto)


def test_sanitize_tag_names():
    tags = sanitize_tag_names(["a/b c", "a_b_c", "ok.name-1", "", "日本"])
    assert tags == ["a_b_c_0", "a_b_c_1", "ok.name-1", "_", "日本"]
    assert len(set(sanitize_tag_names(["x/y", "x_y", "x y"]))) == 3


def test_eval_results_tags_and_values(tmp_path, result):
    with SummaryWriters(tmp_path, enabled=True) as w:
        w.eval_results(3, result, result.label_names)
    acc = load(tmp_path / "eval")
    tensor_tags = set(acc.Tags()["tensors"])
    tags = sanitize_tag_names(result.label_names)
    assert "x_y_10" in tags and "x_y_11" in tags

    for name, v in result.aggregates.items():
        if np.isfinite(v):
            assert value(acc, f"metrics/{name}") == pytest.approx(v, rel=1e-6), name
    assert acc.Tensors("metrics/micro_f1")[-1].step == 3
    pl = result.per_label
    for metric in PER_LABEL_METRICS:
        for i, tag in enumerate(tags):
            full = f"per_label/{metric}/{tag}"
            if np.isnan(pl[metric][i]):
                assert full not in tensor_tags  # undefined is not written
            else:
                assert value(acc, full) == pytest.approx(pl[metric][i], rel=1e-6), full
                assert acc.SummaryMetadata(full).plugin_data.plugin_name == "scalars"
    assert f"per_label/roc_auc/{tags[7]}" not in tensor_tags and f"per_label/support/{tags[7]}" in tensor_tags

    for metric in ("roc_auc", "f1"):
        tag = f"label_distribution/{metric}"
        assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "histograms"
        assert value(acc, tag)[:, 2].sum() == np.sum(~np.isnan(pl[metric]))  # NaN skipped

    # Default PR curves: 5 most frequent + 5 worst by PR-AUC (disjoint here).
    support = pl["support"]
    frequent = list(np.argsort(-support, kind="stable")[:5])
    worst = list(compute.worst_labels(result, 5))
    expected = {f"pr_curve/{tags[i]}" for i in frequent + worst}
    assert len(expected) == 10
    assert set(acc.PluginTagToContent("pr_curves")) == expected
    data = value(acc, f"pr_curve/{tags[frequent[0]]}")
    assert data.shape == (6, BINS + 1)
    assert data[0, 0] == support[frequent[0]]  # tp at threshold 0 = all positives
    assert data[0, 0] + data[3, 0] == data[0, -1] + data[3, -1]  # tp + fn constant

    assert acc.SummaryMetadata("worst_labels").plugin_data.plugin_name == "text"
    text = value(acc, "worst_labels").item().decode()
    assert result.label_names[worst[0]] in text and "| label | support |" in text


def test_pr_curve_labels_explicit(tmp_path, result):
    w = SummaryWriters(tmp_path, enabled=True)
    w.eval_results(1, result, result.label_names, pr_curve_labels=["x/y", "topic/3 name"])
    w.close()
    assert set(load(tmp_path / "eval").PluginTagToContent("pr_curves")) == {"pr_curve/x_y_10", "pr_curve/topic_3_name"}
    with pytest.raises(ValueError, match="nope"):
        SummaryWriters(tmp_path, enabled=True).eval_results(1, result, result.label_names, pr_curve_labels=["nope"])


def test_pr_curve_data_from_histograms():
    pos = np.array([0, 1, 2, 3], float)  # 4 bins, thresholds 0, .25, .5, .75, 1
    neg = np.array([4, 3, 0, 1], float)
    tp, fp, tn, fn, prec, rec = pr_curve_data(pos, neg)
    np.testing.assert_array_equal(tp, [6, 6, 5, 3, 0])
    np.testing.assert_array_equal(fp, [8, 4, 1, 1, 0])
    np.testing.assert_array_equal(tn, [0, 4, 7, 7, 8])
    np.testing.assert_array_equal(fn, [0, 0, 1, 3, 6])
    np.testing.assert_allclose(prec, [6 / 14, 6 / 10, 5 / 6, 3 / 4, 0], rtol=1e-6)
    np.testing.assert_allclose(rec, [1, 1, 5 / 6, 1 / 2, 0], rtol=1e-6)
    merged = pr_curve_data(np.ones(1000), np.ones(1000))
    assert merged.shape == (6, 201) and merged[0, 100] == 500


def test_scalars_and_hparams(tmp_path):
    w = SummaryWriters(tmp_path, enabled=True)
    w.scalars("train", 5, {"loss": np.float32(0.25), "lr": 1e-3, "bad": float("nan")})
    w.hparams({"lr": 1e-3, "optimizer": "adam", "layers": np.int64(2), "bn": True, "x": None},
              {"micro_f1": 0.5, "precision@1": 0.75}, step=9)
    with pytest.raises(ValueError, match="unknown summary run"):
        w.scalars("test", 1, {"a": 1.0})
    w.close()
    train = load(tmp_path / "train")
    assert value(train, "loss") == pytest.approx(0.25) and train.Tensors("loss")[0].step == 5
    assert "bad" not in train.Tags()["tensors"]

    root = load(tmp_path)
    content = root.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info"}
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in exp.metric_infos} == {"final/micro_f1", "final/precision@1"}
    assert {h.name for h in exp.hparam_infos} == {"lr", "optimizer", "layers", "bn", "x"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer"].string_value == "adam"
    assert start.hparams["layers"].number_value == 2 and start.hparams["bn"].bool_value
    assert start.hparams["x"].string_value == "None"
    assert value(root, "final/precision@1") == pytest.approx(0.75)


def test_disabled_writes_nothing(tmp_path, result):
    logdir = tmp_path / "logs"
    w = SummaryWriters(logdir, enabled=False)
    w.scalars("train", 1, {"loss": 1.0})
    w.eval_results(1, result, result.label_names)
    w.hparams({"lr": 0.1}, {"micro_f1": 0.1})
    w.flush()
    w.close()
    assert not logdir.exists()
    assert os.listdir(tmp_path) == []
