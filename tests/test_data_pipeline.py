"""data_pipeline end to end on real files: generate -> inspect -> read back through the reader.

Every test writes real TFRecord shards into a temporary directory and reads them back with the same
``make_dataset`` the trainer uses; expected values come from an independent path (the generator's own
random draws, or records decoded one at a time with tf.train.Example).
"""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import cli
from data_pipeline import generate as gen
from data_pipeline import manifest as mf
from data_pipeline import validate
from data_pipeline.reader import ReaderOptions, make_dataset
from data_pipeline.writer import DatasetWriter, encode_example

N, F, L, SHARDS, SEED, EVAL = 3000, 32, 20, 4, 5, 0.2
ORDERED = dict(shuffle=False, repeat=False, deterministic=True, cycle_length=1)  # dataset order


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A generated dataset (packed, blocks of 256): train 2400 examples in 4 shards, eval 600 in 1 shard."""
    out = str(tmp_path_factory.mktemp("gen") / "ds")
    gen.generate(out, N, F, L, SHARDS, SEED, split_eval=EVAL)
    return out


def regenerate(num_examples, num_features, num_labels, num_shards, seed, split_eval):
    """Replays the generator's random draws (each chunk of 2048 examples of a split from its own seed, see
    generate.chunk_examples): {split: (x, multi-hot y)}."""
    fn = gen.make_hidden_function(num_features, num_labels, num_examples, seed)
    num_eval = int(round(num_examples * split_eval))
    out = {}
    for split_index, (split, n) in enumerate([("train", num_examples - num_eval), ("eval", num_eval)][:1 + bool(num_eval)]):
        xs, ys = [], []
        for chunk in range(-(-n // 2048)):
            rng = np.random.default_rng([seed, split_index, chunk])
            x = rng.normal(size=(2048, num_features)).astype(np.float32)
            z = fn.logits(x) + fn.noise * rng.normal(size=(2048, num_labels))
            xs.append(x)
            ys.append(z > fn.thresholds)
        out[split] = np.concatenate(xs)[:n], np.concatenate(ys)[:n].astype(np.float32)
    return out


def read_all(data_dir, split, batch_size=128, input_context=None, **options):
    """Reads a whole split through make_dataset; returns (x, y) as NumPy arrays."""
    opts = ReaderOptions(**{**ORDERED, **options})
    xs, ys = [], []
    for x, y in make_dataset(data_dir, split, batch_size, input_context=input_context, options=opts):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def decode_shards(data_dir, split):
    """Decodes every record one at a time (validate.iter_split_examples, NumPy), in dataset order:
    [(shard, features, label list)] per example."""
    return [(os.path.basename(path), row, sorted(labels[i].tolist()))
            for path, _, x, labels, _ in validate.iter_split_examples(data_dir, split) for i, row in enumerate(x)]


def rows(x, y):
    """Multiset of examples (features and labels as bytes), for comparisons that ignore order."""
    return collections.Counter(r.tobytes() for r in np.concatenate([x, y], axis=1))


def test_generate_inspect_and_read_back_equal_the_generator_arrays(synthetic, capsys):
    assert cli.main(["inspect", synthetic]) == 0
    out = capsys.readouterr().out
    assert "train: 2400 examples in 4 shards" in out and "eval: 600 examples in 1 shards" in out

    expected = regenerate(N, F, L, SHARDS, SEED, EVAL)
    m = mf.read_manifest(synthetic)
    for split, (x_exp, y_exp) in expected.items():
        x, y = read_all(synthetic, split)
        np.testing.assert_array_equal(x, x_exp)  # bit-exact: features are stored as raw float32
        np.testing.assert_array_equal(y, y_exp)
        assert m.splits[split].label_counts == y_exp.sum(axis=0).astype(int).tolist()


def test_reader_multi_hot_equals_the_label_lists_of_the_records(synthetic):
    records = decode_shards(synthetic, "train")
    x, y = read_all(synthetic, "train", batch_size=100)
    assert len(records) == len(x) == 2400
    for i, (_, features, labels) in enumerate(records):
        np.testing.assert_array_equal(x[i], features)
        assert np.flatnonzero(y[i]).tolist() == sorted(labels)


def test_generated_examples_do_not_depend_on_the_layout(synthetic, tmp_path):
    gen.generate(str(tmp_path / "e"), N, F, L, SHARDS, SEED, split_eval=EVAL, layout="example")
    assert mf.read_manifest(str(tmp_path / "e")).feature_encoding == mf.DENSE
    assert mf.read_manifest(synthetic).feature_encoding == mf.PACKED_DENSE
    for split in ("train", "eval"):
        for a, b in zip(read_all(str(tmp_path / "e"), split), read_all(synthetic, split), strict=True):
            np.testing.assert_array_equal(a, b)


def test_generate_is_deterministic_for_a_seed(tmp_path):
    def shards(out):
        return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".tfrecord")}

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        gen.generate(str(tmp_path / name), 400, 8, 6, 2, seed)
    a, b, c = shards(tmp_path / "a"), shards(tmp_path / "b"), shards(tmp_path / "c")
    assert a == b and len(a) == 2
    assert a.keys() == c.keys() and a != c


def test_labels_are_long_tailed_and_learnable(synthetic):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    counts = np.asarray(mf.read_manifest(synthetic).splits["train"].label_counts)
    assert counts[0] > 5 * counts[-1] > 0
    assert counts[: L // 4].sum() > counts[-L // 4:].sum() * 3

    x_train, y_train = read_all(synthetic, "train")
    x_eval, y_eval = read_all(synthetic, "eval")
    for label in (0, 1, 2):
        model = LogisticRegression(max_iter=500).fit(x_train, y_train[:, label])
        constant_acc = max(y_eval[:, label].mean(), 1 - y_eval[:, label].mean())
        assert model.score(x_eval, y_eval[:, label]) > constant_acc + 0.03
        assert roc_auc_score(y_eval[:, label], model.predict_proba(x_eval)[:, 1]) > 0.75


def _pipelines(data_dir, split, n, **options):
    return [read_all(data_dir, split, 64, tf.distribute.InputContext(num_input_pipelines=n, input_pipeline_id=i,
                                                                     num_replicas_in_sync=n), **options)
            for i in range(n)]


def test_two_input_pipelines_read_disjoint_files_covering_the_split(synthetic):
    shard_of = {x.tobytes(): shard for shard, x, _ in decode_shards(synthetic, "train")}
    everything = rows(*read_all(synthetic, "train"))
    # Training options: shuffled, non-deterministic order.
    parts = _pipelines(synthetic, "train", 2, shuffle=True, deterministic=False, cycle_length=8)
    files = [{shard_of[row.tobytes()] for row in x} for x, _ in parts]
    assert files[0].isdisjoint(files[1]) and len(files[0] | files[1]) == SHARDS
    counted = [rows(x, y) for x, y in parts]
    assert not (counted[0] & counted[1])
    assert counted[0] + counted[1] == everything


@pytest.mark.parametrize("split,pipelines", [("eval", 2), ("train", 5)])
def test_record_sharding_when_fewer_files_than_pipelines(synthetic, split, pipelines):
    # eval has 1 file for 2 pipelines; train 4 files for 5. With several files the pipelines must agree
    # on the file order although each shuffles, or their record shards would overlap.
    everything = rows(*read_all(synthetic, split))
    parts = [rows(x, y) for x, y in _pipelines(synthetic, split, pipelines, shuffle=True, deterministic=False,
                                               cycle_length=8)]
    assert sum(parts, collections.Counter()) == everything
    for i in range(pipelines):
        assert sum(parts[i].values()) > 0
        for j in range(i):
            assert not (parts[i] & parts[j])


def test_skip_batches_continues_where_an_uninterrupted_read_would_be(synthetic):
    opts = ReaderOptions(shuffle=True, repeat=True, deterministic=True, seed=7)

    def batches(skip, n):
        ds = make_dataset(synthetic, "train", 256, options=opts, skip_batches=skip)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]

    full = batches(0, 14)  # 2400 / 256: crosses the end of the first epoch
    resumed = batches(6, 8)
    for (xa, ya), (xb, yb) in zip(full[6:], resumed, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(full[0][0], resumed[0][0])


@pytest.mark.parametrize("encoding", [mf.SPARSE, mf.PACKED_SPARSE])
def test_sparse_encoding_reads_back_densified(tmp_path, encoding):
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((300, 50)) < 0.1, rng.normal(size=(300, 50)), 0).astype(np.float32)
    labels = [sorted(rng.choice(7, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(300)]

    def examples():
        for i in range(300):
            idx = np.flatnonzero(dense[i])
            yield (idx, dense[i, idx]), labels[i], f"row {i}"

    with DatasetWriter(str(tmp_path / "sp"), 50, 7, encoding=encoding, block_size=32) as w:
        w.write_split("train", examples(), 300, 3)
    assert mf.read_manifest(str(tmp_path / "sp")).feature_encoding == encoding
    x, y = read_all(str(tmp_path / "sp"), "train", batch_size=64)
    np.testing.assert_array_equal(x, dense)
    assert [np.flatnonzero(r).tolist() for r in y] == labels


def test_on_bad_features_skip_drops_and_counts_non_finite_rows(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    bad = [3, 50, 51, 199]
    x[bad[0], 1], x[bad[1], 0], x[bad[2], 5], x[bad[3], 2] = np.nan, np.inf, -np.inf, np.nan
    labels = [[i % 4] for i in range(200)]
    keep = np.setdiff1d(np.arange(200), bad)

    # Writer: skipped rows are counted and never reach the shards.
    with DatasetWriter(str(tmp_path / "w"), 6, 4, on_bad_features="skip") as w:
        w.write_split("train", ((x[i], labels[i], f"row {i}") for i in range(200)), 200, 2)
    assert w.num_skipped == 4
    xr, yr = read_all(str(tmp_path / "w"), "train")
    np.testing.assert_array_equal(xr, x[keep])

    # Reader: a dataset that holds NaN rows (written by hand) is read with those rows dropped and counted,
    # still in full batches.
    d = tmp_path / "r"
    d.mkdir()
    with tf.io.TFRecordWriter(str(d / mf.shard_name("train", 0, 1))) as f:
        for i in range(200):
            f.write(encode_example(x[i], labels[i], mf.DENSE))
    counts = np.bincount([l[0] for l in labels], minlength=4).tolist()
    mf.write_manifest(str(d), mf.Manifest(6, 4, ["a", "b", "c", "d"], mf.DENSE,
                                          {"train": mf.SplitInfo([mf.shard_name("train", 0, 1)], [200], counts)}))
    counter = tf.Variable(0, dtype=tf.int64)
    ds = make_dataset(str(d), "train", 32, options=ReaderOptions(**ORDERED, on_bad_features="skip"),
                      bad_feature_counter=counter)
    batches = [b[0].numpy() for b in ds]
    assert int(counter.numpy()) == 4
    assert [len(b) for b in batches] == [32] * 6 + [196 - 192]
    np.testing.assert_array_equal(np.concatenate(batches), x[keep])
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN/Inf"):
        list(make_dataset(str(d), "train", 32, options=ReaderOptions(**ORDERED)))


def _write_by_hand(d, x, labels, encoding):
    """One shard of records encoded by ``encode_example`` plus a matching manifest."""
    os.makedirs(d)
    with tf.io.TFRecordWriter(os.path.join(d, mf.shard_name("train", 0, 1))) as f:
        for row, lab in zip(x, labels):
            f.write(encode_example(row, lab, encoding))
    counts = np.zeros(4, np.int64)
    for lab in labels:
        counts[np.unique(np.asarray(lab, np.int64))] += 1
    mf.write_manifest(d, mf.Manifest(x.shape[1], 4, ["a", "b", "c", "d"], encoding,
                                     {"train": mf.SplitInfo([mf.shard_name("train", 0, 1)], [len(x)],
                                                            counts.tolist())}))


def test_float_list_and_older_bytes_encoding_read_back_the_same(tmp_path, capsys):
    """Datasets written before the float-list encoding (one bytes value per record) still read and inspect;
    labels with duplicates or none at all become the same multi-hot rows in both."""
    x = np.random.default_rng(2).normal(size=(50, 6)).astype(np.float32)
    labels = [[], [3, 3], [0, 1, 2, 3], [2, 0, 2]] + [[i % 4] for i in range(46)]
    expected_y = np.zeros((50, 4), np.float32)
    for i, lab in enumerate(labels):
        expected_y[i, lab] = 1.0
    for encoding in (mf.DENSE, mf.DENSE_BYTES):
        d = str(tmp_path / encoding)
        _write_by_hand(d, x, labels, encoding)
        assert cli.main(["inspect", d]) == 0
        assert encoding in capsys.readouterr().out
        xr, yr = read_all(d, "train", batch_size=16)
        np.testing.assert_array_equal(xr, x)
        np.testing.assert_array_equal(yr, expected_y)
    feature = tf.train.Example.FromString(encode_example(x[0], [1], mf.DENSE)).features.feature[mf.KEY_DENSE]
    np.testing.assert_array_equal(np.asarray(feature.float_list.value, np.float32), x[0])


@pytest.mark.parametrize("values, finite", [
    ([1.0, -2.0, 0.0], True),
    ([3e38, 3e38, 3e38, -1.0], True),  # the sum overflows to Inf; every value is finite
    ([1.0, np.nan, 2.0], False),
    ([np.inf, 1.0], False),
    ([np.inf, -np.inf], False),  # sum NaN
    ([-3e38, -3e38, np.nan], False),
])
def test_all_finite_is_exact_even_when_the_sum_overflows(values, finite):
    from data_pipeline.rows import all_finite

    assert bool(all_finite(tf.constant([values], tf.float32))) is finite
    assert bool(tf.function(all_finite)(tf.constant([values], tf.float32))) is finite
