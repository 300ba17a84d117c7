"""TensorFlow Datasets in and out: a tiny TFDS dataset built here (tests/tfds_tiny.py, no downloads) converted
with ``convert --format tfds`` and compared with the arrays it was made from; datasets this package writes
opened with ``tfds.builder_from_directory`` and compared with what our reader yields."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tfds_tiny
from data_pipeline import cli
from data_pipeline import manifest as mf
from data_pipeline.generate import generate
from data_pipeline.hashing import HashSpec
from data_pipeline.reader import ReaderOptions, make_dataset

ORDERED = ReaderOptions(shuffle=False, repeat=False, deterministic=True, cycle_length=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tfds_tiny.prepare(tmp_path_factory.mktemp("tfds"))


def convert(tiny, out, *flags):
    assert cli.main(["convert", "--format", "tfds", "--input", tiny, "--out", str(out), *map(str, flags)]) == 0
    return mf.read_manifest(str(out))


def read_all(data_dir, split):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in make_dataset(str(data_dir), split, 8, options=ORDERED)])
    return np.concatenate(xs), np.concatenate(ys)


def multiset(x, y):
    """Examples as a multiset of (feature bytes, label tuple): TFDS stores examples in its own order."""
    return collections.Counter((np.asarray(r, np.float32).tobytes(), tuple(np.flatnonzero(l))) for r, l in zip(x, y))


def test_dense_features_and_sequence_of_class_labels(tiny, tmp_path):
    m = convert(tiny, tmp_path / "o", "--feature-keys", "vec", "--label-keys", "topics")
    assert (m.num_features, m.num_labels, m.label_names) == (6, 4, tfds_tiny.TOPICS)
    assert m.feature_encoding == mf.PACKED_DENSE and sorted(m.splits) == ["test", "train"]
    for split in tfds_tiny.SPLIT_SIZES:
        rows = tfds_tiny.source_rows(split)
        expected = multiset([r["vec"] for r in rows], [np.isin(range(4), r["topics"]) for r in rows])
        assert multiset(*read_all(tmp_path / "o", split)) == expected


def test_token_ids_bag_of_words_and_multi_hot_labels(tiny, tmp_path):
    m = convert(tiny, tmp_path / "o", "--feature-keys", "vec", "token_ids", "--num-features", tfds_tiny.VOCAB,
                "--label-keys", "multi_hot", "--layout", "example")
    assert (m.num_features, m.num_labels, m.feature_encoding) == (6 + tfds_tiny.VOCAB, 4, mf.SPARSE)
    rows = tfds_tiny.source_rows("train")
    x = [np.concatenate([r["vec"], np.bincount(r["token_ids"], minlength=tfds_tiny.VOCAB)]) for r in rows]
    assert multiset(*read_all(tmp_path / "o", "train")) == multiset(x, [r["multi_hot"] for r in rows])


def test_hashed_text_and_boolean_label_features(tiny, tmp_path):
    buckets = 16
    m = convert(tiny, tmp_path / "o", "--feature-keys", "text", "--hash-features", buckets,
                "--label-keys", *tfds_tiny.FLAGS)
    assert (m.num_features, m.label_names, m.feature_hashing) == (buckets, tfds_tiny.FLAGS, HashSpec(buckets))
    rows = tfds_tiny.source_rows("test")
    x = np.zeros((len(rows), buckets), np.float32)
    for i, r in enumerate(rows):
        for word in r["text"].split():
            x[i, int(tf.strings.to_hash_bucket_fast([word], buckets).numpy()[0])] += 1
    y = [[r[flag] for flag in tfds_tiny.FLAGS] for r in rows]
    assert multiset(*read_all(tmp_path / "o", "test")) == multiset(x, y)


@pytest.mark.parametrize("flags, message", [
    (["--feature-keys", "vex", "--label-keys", "topics"], "--feature-keys 'vex' is not a feature of the dataset"),
    (["--feature-keys", "text", "--label-keys", "topics"], "--feature-keys 'text' holds text: pass --hash-features"),
    (["--feature-keys", "token_ids", "--label-keys", "topics"], "pass --num-features"),
    (["--feature-keys", "vec", "--label-keys", "text"], "--label-keys 'text' is Text"),
    (["--feature-keys", "vec", "--label-keys", "is_short", "vec"], "--label-keys 'vec' is not a boolean scalar"),
    (["--feature-keys", "vec"], "needs --feature-keys and --label-keys"),
    (["--feature-keys", "vec", "--label-keys", "topics", "--splits", "train"], "--splits: not used by --format tfds"),
])
def test_bad_tfds_input_is_one_line(tiny, tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    assert cli.main(["convert", "--format", "tfds", "--input", tiny, "--out", str(out), *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_not_a_tfds_directory(tmp_path, capsys):
    assert cli.main(["convert", "--format", "tfds", "--input", str(tmp_path), "--feature-keys", "x",
                     "--label-keys", "y", "--out", str(tmp_path / "o")]) == 2
    assert f"error: {tmp_path}: not a prepared TFDS dataset directory" in capsys.readouterr().err


@pytest.mark.parametrize("layout, sparse", [("example", False), ("example", True)])
def test_tfds_reads_one_example_per_record_datasets(tmp_path, layout, sparse):
    out = tmp_path / "d"
    m = generate(str(out), 300, 7, 5, 2, seed=0, split_eval=0.2, layout=layout, sparse_nonzeros=3 if sparse else None)
    builder = tfds.builder_from_directory(str(out))
    assert {s: builder.info.splits[s].num_examples for s in m.splits} == {s: i.num_examples for s, i in m.splits.items()}
    assert builder.info.features["y"].feature.names == m.label_names
    x, y = read_all(out, "eval")
    got = list(tfds.as_numpy(builder.as_dataset(split="eval", shuffle_files=False)))
    dense = [np.bincount(e["xi"], e["xv"], minlength=7) if sparse else e["x"] for e in got]
    np.testing.assert_allclose(np.array(dense), x, rtol=1e-6)
    assert [e["y"].tolist() for e in got] == [np.flatnonzero(r).tolist() for r in y]
    frame = tfds.as_dataframe(builder.as_dataset(split="eval", shuffle_files=False), builder.info)
    assert len(frame) == m.splits["eval"].num_examples
    assert set(frame.columns) == ({"xi", "xv", "y"} if sparse else {"x", "y"})


@pytest.mark.parametrize("sparse", [False, True])
def test_tfds_reads_packed_datasets_one_block_per_example(tmp_path, sparse):
    out = tmp_path / "d"
    generate(str(out), 300, 7, 5, 2, seed=0, block_size=32, sparse_nonzeros=3 if sparse else None)
    builder = tfds.builder_from_directory(str(out))
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["splits"][0]["filepathTemplate"] == "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
    blocks = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
    assert builder.info.splits["train"].num_examples == len(blocks) == -(-300 // 32)
    assert sum(int(b["n"]) for b in blocks) == 300 and [int(b["id"]) for b in blocks] == list(range(0, 300, 32))
    # A TFDS example is a block record as data_pipeline/packed.py defines it: decode one with NumPy.
    first = blocks[0]
    labels = np.frombuffer(first["y"], "<i4")
    offsets = np.frombuffer(first["yp"], "<i4")
    x, y = read_all(out, "train")
    assert [labels[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == \
        [np.flatnonzero(r).tolist() for r in y[:32]]
    if not sparse:
        np.testing.assert_array_equal(first["x"].reshape(32, 7), x[:32])
    frame = tfds.as_dataframe(builder.as_dataset(split="train", shuffle_files=False), builder.info)
    assert len(frame) == len(blocks) and {"n", "id", "y", "yp"} <= set(frame.columns)


def test_converted_tfds_dataset_opens_in_tfds_with_label_names(tiny, tmp_path):
    convert(tiny, tmp_path / "o", "--feature-keys", "vec", "--label-keys", "topics", "--layout", "example")
    builder = tfds.builder_from_directory(str(tmp_path / "o"))
    assert builder.info.features["y"].feature.names == tfds_tiny.TOPICS
    frame = tfds.as_dataframe(builder.as_dataset(split="test"), builder.info)
    assert len(frame) == tfds_tiny.SPLIT_SIZES["test"]
