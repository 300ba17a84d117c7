"""Feature hashing (``convert --hash-features N``): LIBSVM files with ids from an open range converted through the
command line and read back through the reader; the buckets the test expects come from TensorFlow's
``to_hash_bucket_fast`` called here on the keys' text (the documented definition), and a few pinned values keep
the mapping from ever changing under datasets already written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import cli
from data_pipeline import manifest as mf
from data_pipeline.errors import DataError
from data_pipeline.hashing import HASH_NAME, HashSpec, hash_feature_ids, hash_features
from data_pipeline.reader import ReaderOptions, make_dataset
from trainer import inference, train
from trainer.config import Config

ORDERED = ReaderOptions(shuffle=False, repeat=False, deterministic=True, cycle_length=1)


def bucket(key: str, n: int) -> int:
    return int(tf.strings.to_hash_bucket_fast([key], n).numpy()[0])


def test_buckets_are_the_documented_hash_and_never_change():
    spec = HashSpec(1000)
    assert hash_feature_ids([17, 0, 123456789], spec).tolist() == [bucket("17", 1000), bucket("0", 1000),
                                                                 bucket("123456789", 1000)]
    assert hash_feature_ids(["the", b"cat"], spec).tolist() == [bucket("the", 1000), bucket("cat", 1000)]
    # Pinned: datasets and exported models depend on these staying the same.
    assert hash_feature_ids([17], spec).tolist() == [838]
    assert hash_feature_ids(["a"], spec).tolist() == [939]
    # An id is hashed as its decimal text, so the id 17 and the token "17" share a bucket.
    assert hash_feature_ids(["17"], spec).tolist() == [838]


def test_hash_features_sums_collisions_and_sorts():
    spec = HashSpec(4)
    tokens = ["the", "cat", "the", "sat", "on", "mat"]
    buckets, values = hash_features(tokens, [1, 2, 3, 4, 5, 6], spec)
    expected = np.zeros(4)
    for t, v in zip(tokens, [1, 2, 3, 4, 5, 6]):
        expected[bucket(t, 4)] += v
    assert buckets.tolist() == np.flatnonzero(expected).tolist()
    np.testing.assert_allclose(values, expected[buckets])
    assert hash_features([], [], spec)[0].size == 0
    with pytest.raises(DataError, match="2 feature ids but 1 values"):
        hash_features([1, 2], [1.0], spec)


@pytest.mark.parametrize("layout", ["packed", "example"])
def test_libsvm_converted_with_hashing_reads_back_hashed(tmp_path, layout):
    rng = np.random.default_rng(0)
    n, buckets = 30, 16
    rows = [(rng.choice(10**9, size=rng.integers(0, 12), replace=False), rng.choice(5, size=2, replace=False))
            for _ in range(n)]
    with open(tmp_path / "train.txt", "w") as f:
        for ids, labels in rows:
            f.write(",".join(map(str, labels)) + " " + " ".join(f"{i}:{(i % 7) + 1}" for i in ids) + "\n")
    out = tmp_path / "hashed"
    assert cli.main(["convert", "--format", "libsvm", "--input", str(tmp_path / "train.txt"), "--num-labels", "5",
                     "--hash-features", str(buckets), "--layout", layout, "--out", str(out)]) == 0

    raw = json.loads((out / mf.MANIFEST_NAME).read_text())
    assert raw["num_features"] == buckets
    assert raw["feature_hashing"] == {"buckets": buckets, "hash": HASH_NAME}
    assert mf.read_manifest(str(out)).feature_hashing == HashSpec(buckets)

    expected = np.zeros((n, buckets), np.float32)
    for r, (ids, _) in enumerate(rows):
        for i in ids:
            expected[r, bucket(str(i), buckets)] += (i % 7) + 1
    assert (np.count_nonzero(expected, axis=1) < [len(ids) for ids, _ in rows]).any(), "no collision tested"
    x = np.concatenate([b[0].numpy() for b in make_dataset(str(out), "train", 8, options=ORDERED)])
    np.testing.assert_array_equal(x, expected)

    # predict --input on the raw file: the run records the dataset's hashing and predict applies it.
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    train._write_run_info(str(model_dir), mf.read_manifest(str(out)), Config(), str(out))
    info = json.loads((model_dir / "run_info.json").read_text())
    ids, values, row_splits = inference._load_libsvm(str(tmp_path / "train.txt"), info, 0)
    predicted = np.zeros((n, buckets), np.float32)
    for r in range(n):
        span = slice(row_splits[r], row_splits[r + 1])
        np.add.at(predicted[r], ids[span], values[span])
        assert np.unique(ids[span]).size == ids[span].size
    np.testing.assert_array_equal(predicted, expected)


@pytest.mark.parametrize("value", ["0", "-3", str(2**31)])
def test_bad_bucket_count_is_one_line_naming_the_flag(tmp_path, capsys, value):
    (tmp_path / "d.txt").write_text("0 1:1\n")
    out = tmp_path / "o"
    assert cli.main(["convert", "--format", "libsvm", "--input", str(tmp_path / "d.txt"), "--hash-features", value,
                     "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: --hash-features: must be in [1, "), err
    assert not out.exists()


def test_manifest_with_inconsistent_hashing_is_refused(tmp_path):
    (tmp_path / "d.txt").write_text("0 1:1\n1 5:2\n")
    out = tmp_path / "o"
    assert cli.main(["convert", "--format", "libsvm", "--input", str(tmp_path / "d.txt"), "--hash-features", "8",
                     "--out", str(out)]) == 0
    path = out / mf.MANIFEST_NAME
    raw = json.loads(path.read_text())
    for hashing, message in (({"buckets": 9, "hash": HASH_NAME}, "9 buckets for 8 features"),
                             ({"buckets": 8, "hash": "md5"}, "unknown feature hash 'md5'")):
        path.write_text(json.dumps({**raw, "feature_hashing": hashing}))
        with pytest.raises(DataError, match=message):
            mf.read_manifest(str(out))
