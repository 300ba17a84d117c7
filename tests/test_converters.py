"""Converters on real files: the Mulan benchmark sets (bibtex sparse ARFF, yeast dense ARFF) and small
LIBSVM / CSV / NPZ files written here, converted through the CLI and read back through the reader.

Expected values are computed from the input text independently of the converters (regular expressions
over the ARFF lines, NumPy arrays the test itself wrote).
"""

from __future__ import annotations

import os
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import cli
from data_pipeline import manifest as mf
from data_pipeline import packed, validate
from data_pipeline.converters import ConvertOptions, split_names
from data_pipeline.converters import convert as convert_files
from data_pipeline.errors import DataError
from data_pipeline.reader import ReaderOptions, make_dataset

# The Mulan sets beside the repository (../shared/datasets), or where MLT_DATASETS says (a git worktree).
DATASETS = Path(os.environ.get("MLT_DATASETS") or Path(__file__).resolve().parents[1].parent / "shared" / "datasets")
ORDERED = ReaderOptions(shuffle=False, repeat=False, deterministic=True, cycle_length=1)


def read_all(data_dir, split, batch_size=256):
    """The whole split through make_dataset, in dataset order: (x, y) NumPy arrays."""
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in make_dataset(str(data_dir), split, batch_size,
                                                                      options=ORDERED)])
    return np.concatenate(xs), np.concatenate(ys)


def decode_records(data_dir, split):
    """Every example decoded from its record (tf.train.Example; packed blocks by packed.decode_block), in dataset
    order: [(features: {index: value} for sparse encodings, else an array, label list)]."""
    m = mf.read_manifest(str(data_dir))
    out = []
    for _, _, raw in validate.iter_split_records(str(data_dir), split, m):
        if m.packed:
            b = packed.decode_block(raw, m)
            for r in range(b.num_rows):
                labels = b.label_indices[b.label_offsets[r]:b.label_offsets[r + 1]].tolist()
                if m.sparse:
                    lo, hi = b.feature_offsets[r], b.feature_offsets[r + 1]
                    out.append((dict(zip(b.feature_indices[lo:hi].tolist(), b.feature_values[lo:hi].tolist())), labels))
                else:
                    out.append((b.features[r], labels))
            continue
        f = tf.train.Example.FromString(raw).features.feature
        if m.feature_encoding == mf.SPARSE:
            feats = dict(zip(f[mf.KEY_SPARSE_INDEX].int64_list.value, f[mf.KEY_SPARSE_VALUE].float_list.value))
        else:
            feats = np.asarray(f[mf.KEY_DENSE].float_list.value, np.float32)
        out.append((feats, list(f[mf.KEY_LABELS].int64_list.value)))
    return out


def convert(*args):
    assert cli.main(["convert", *map(str, args)]) == 0


def arff_sparse_rows(path):
    """Parses the data lines of a sparse ARFF file with a regex: [{attribute index: value}]."""
    text = Path(path).read_text()
    data = text[re.search(r"^@data\s*$", text, re.M | re.I).end():]
    return [{int(i): float(v) for i, v in re.findall(r"(\d+) ([^,}]+)", line)}
            for line in data.splitlines() if line.strip().startswith("{")]


@pytest.fixture(scope="module")
def bibtex(tmp_path_factory):
    out = tmp_path_factory.mktemp("bib") / "bibtex"
    d = DATASETS / "bibtex"
    convert("--format", "arff", "--input", d / "bibtex-train.arff", d / "bibtex-test.arff", "--out", out)
    return out


def test_bibtex_sparse_arff_shape_and_splits(bibtex):
    m = mf.read_manifest(str(bibtex))
    assert (m.num_features, m.num_labels, m.feature_encoding) == (1836, 159, mf.PACKED_SPARSE)
    assert {k: v.num_examples for k, v in m.splits.items()} == {"train": 4880, "test": 2515}
    assert m.label_names[0] == "TAG_2005" and m.label_names[-1] == "TAG_wiki"


def test_bibtex_records_match_the_arff_text(bibtex):
    for split in ("train", "test"):
        text_rows = arff_sparse_rows(DATASETS / "bibtex" / f"bibtex-{split}.arff")
        records = decode_records(bibtex, split)
        assert len(records) == len(text_rows)
        for (feats, labels), row in zip(records, text_rows):
            # Label attributes are 1836..1994 in the file; features are 0..1835.
            assert labels == sorted(i - 1836 for i, v in row.items() if i >= 1836 and v == 1)
            assert feats == {i: v for i, v in row.items() if i < 1836}

    # And through the reader (densified): first, second and last training record.
    text_rows = arff_sparse_rows(DATASETS / "bibtex" / "bibtex-train.arff")
    x, y = read_all(bibtex, "train")
    assert x.shape == (4880, 1836) and y.shape == (4880, 159)
    for i in (0, 1, 4879):
        row = text_rows[i]
        assert np.flatnonzero(y[i]).tolist() == sorted(k - 1836 for k in row if k >= 1836)
        assert np.flatnonzero(x[i]).tolist() == sorted(k for k in row if k < 1836)
    assert np.flatnonzero(y[0]).tolist() == [3, 23, 61, 63, 76]  # from the first data line, by hand


def test_yeast_dense_arff(tmp_path):
    d = DATASETS / "yeast"
    convert("--format", "arff", "--input", d / "yeast-train.arff", d / "yeast-test.arff", "--out", tmp_path / "y")
    m = mf.read_manifest(str(tmp_path / "y"))
    assert (m.num_features, m.num_labels, m.feature_encoding) == (103, 14, mf.PACKED_DENSE)
    assert {k: v.num_examples for k, v in m.splits.items()} == {"train": 1500, "test": 917}
    # Label order is the ARFF attribute order (the XML lists Class6 before Class4).
    assert m.label_names == [f"Class{i}" for i in range(1, 15)]

    lines = [line for line in (d / "yeast-test.arff").read_text().splitlines()
             if line and line[0] in "-0123456789"]
    expected = np.array([[float(v) for v in line.split(",")] for line in lines], np.float32)
    x, y = read_all(tmp_path / "y", "test")
    np.testing.assert_array_equal(x, expected[:, :103])
    np.testing.assert_array_equal(y, expected[:, 103:])


def test_libsvm_round_trip_with_xmc_header_and_empty_labels(tmp_path):
    rng = np.random.default_rng(0)
    n, f, l = 40, 12, 9
    dense = np.where(rng.random((n, f)) < 0.3, rng.integers(1, 100, (n, f)) / 8, 0).astype(np.float32)
    labels = [sorted(rng.choice(l, size=rng.integers(0, 3), replace=False).tolist()) for _ in range(n)]
    labels[-1] = [l - 1]  # the largest label, so the header and the data agree on the count

    def write(path, base, header):
        with open(path, "w") as fh:
            if header:
                fh.write(f"{n} {f} {l}\n")
            for i in range(n):
                feats = " ".join(f"{j + base}:{dense[i, j]:g}" for j in np.flatnonzero(dense[i]))
                fh.write(f"{','.join(map(str, labels[i]))} {feats}\n")

    write(tmp_path / "train.txt", 0, header=True)
    write(tmp_path / "classic.svm", 1, header=False)
    convert("--format", "libsvm", "--input", tmp_path / "train.txt", "--out", tmp_path / "a", "--shards", 3)
    convert("--format", "libsvm", "--input", tmp_path / "classic.svm", "--index-base", 1,
            "--num-features", f, "--num-labels", l, "--encoding", "dense", "--out", tmp_path / "b")
    convert("--format", "libsvm", "--input", tmp_path / "train.txt", "--layout", "example", "--out", tmp_path / "c")
    for out, encoding in (("a", mf.PACKED_SPARSE), ("b", mf.PACKED_DENSE), ("c", mf.SPARSE)):
        m = mf.read_manifest(str(tmp_path / out))
        assert (m.num_features, m.num_labels, m.feature_encoding) == (f, l, encoding)
        x, y = read_all(tmp_path / out, "train", batch_size=16)
        np.testing.assert_array_equal(x, dense)
        assert [np.flatnonzero(r).tolist() for r in y] == labels


def test_libsvm_shape_from_data_without_header(tmp_path):
    (tmp_path / "d.txt").write_text("0,4 0:1 7:2.5\n\n 2:1\n1 3:0.5\n")
    convert("--format", "libsvm", "--input", tmp_path / "d.txt", "--out", tmp_path / "o")
    m = mf.read_manifest(str(tmp_path / "o"))
    assert (m.num_features, m.num_labels, m.splits["train"].num_examples) == (8, 5, 3)
    x, y = read_all(tmp_path / "o", "train")
    assert x[0, 7] == 2.5 and y[0].tolist() == [1, 0, 0, 0, 1] and not y[1].any()

    # --label-names: its length is the label count (labels never seen in the data included).
    (tmp_path / "names.txt").write_text("\n".join(f"tag{i}" for i in range(7)) + "\n")
    convert("--format", "libsvm", "--input", tmp_path / "d.txt", "--label-names", tmp_path / "names.txt",
            "--out", tmp_path / "o2")
    m = mf.read_manifest(str(tmp_path / "o2"))
    assert m.num_labels == 7 and m.label_names[6] == "tag6"


def test_csv_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4)).round(4).astype(np.float32)
    y = (rng.random((30, 3)) < 0.4).astype(np.float32)
    # Columns interleaved, and the test file orders them differently: matched by name.
    header = ["f0", "tag_a", "f1", "f2", "tag_b", "tag_c", "f3"]
    order = [0, 4, 1, 2, 5, 6, 3]  # header position -> column in [x | y]
    table = np.concatenate([x, y], axis=1)

    def write(path, rows, cols):
        with open(path, "w") as fh:
            fh.write(",".join(header[c] for c in cols) + "\n")
            for r in rows:
                fh.write(",".join(f"{table[r, order[c]]:g}" for c in cols) + "\n")

    write(tmp_path / "train.csv", range(20), range(7))
    write(tmp_path / "valid.csv", range(20, 30), [6, 5, 4, 3, 2, 1, 0])
    convert("--format", "csv", "--input", tmp_path / "train.csv", tmp_path / "valid.csv",
            "--label-columns", "tag_*", "--out", tmp_path / "o")
    m = mf.read_manifest(str(tmp_path / "o"))
    assert m.label_names == ["tag_a", "tag_b", "tag_c"] and m.num_features == 4
    for split, rows in (("train", slice(0, 20)), ("eval", slice(20, 30))):
        xr, yr = read_all(tmp_path / "o", split)
        np.testing.assert_array_equal(xr, x[rows])
        np.testing.assert_array_equal(yr, y[rows])

    convert("--format", "csv", "--input", tmp_path / "train.csv", "--label-columns", "tag_c,tag_a",
            "--out", tmp_path / "o2")
    assert mf.read_manifest(str(tmp_path / "o2")).label_names == ["tag_a", "tag_c"]


def test_npz_round_trip_dense_and_csr_labels(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(25, 5)).astype(np.float32)
    y = (rng.random((25, 6)) < 0.3).astype(np.int8)
    np.savez(tmp_path / "train.npz", x=x[:15], y=y[:15], label_names=np.array(list("abcdef")))
    rows, cols = np.nonzero(y[15:])
    np.savez_compressed(tmp_path / "test.npz", features=x[15:], label_indices=cols,
                        label_indptr=np.searchsorted(rows, np.arange(11)))
    convert("--format", "npz", "--input", tmp_path / "train.npz", tmp_path / "test.npz", "--out", tmp_path / "o")
    m = mf.read_manifest(str(tmp_path / "o"))
    assert (m.num_features, m.num_labels, m.label_names) == (5, 6, list("abcdef"))
    for split, sl in (("train", slice(0, 15)), ("test", slice(15, 25))):
        xr, yr = read_all(tmp_path / "o", split)
        np.testing.assert_array_equal(xr, x[sl])
        np.testing.assert_array_equal(yr, y[sl])


def test_convert_takes_typed_options_without_the_command_line(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(tmp_path / "a.npz", x=x, y=np.eye(4, 2, dtype=np.int8))
    m = convert_files(ConvertOptions(format="npz", inputs=(str(tmp_path / "a.npz"),), out=str(tmp_path / "o"),
                                     feature_dtype="bfloat16", block_size=2))
    assert (m.feature_encoding, m.feature_dtype, m.block_size) == (mf.PACKED_DENSE, "bfloat16", 2)
    assert m.splits["train"].shard_lengths == [2, 2]
    xr, yr = read_all(tmp_path / "o", "train")
    np.testing.assert_array_equal(xr, x)  # small integers are exact in bfloat16
    np.testing.assert_array_equal(yr, np.eye(4, 2))
    with pytest.raises(DataError, match="already exists"):
        convert_files(ConvertOptions(format="npz", inputs=(str(tmp_path / "a.npz"),), out=str(tmp_path / "o")))


def test_libsvm_conversion_streams(tmp_path):
    """Peak Python memory during a conversion stays far below the size of the input file."""
    rng = np.random.default_rng(3)
    path = tmp_path / "big-train.txt"
    with open(path, "w") as fh:
        for i in range(5000):
            idx = np.sort(rng.choice(5000, size=60, replace=False))
            fh.write(f"{i % 100},{(i * 7) % 100} " + " ".join(f"{j}:{v:.5f}" for j, v in zip(idx, rng.random(60)))
                     + "\n")
    size = path.stat().st_size
    assert size > 3_000_000
    # A small conversion first, so that imports and first-use caches are not counted.
    (tmp_path / "small.txt").write_text("1,2 0:1 4999:2\n")
    convert("--format", "libsvm", "--input", tmp_path / "small.txt", "--out", tmp_path / "warm")
    tracemalloc.start()
    try:
        convert("--format", "libsvm", "--input", path, "--out", tmp_path / "o", "--shards", 4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 10, f"peak {peak} bytes for a {size}-byte file"
    assert mf.read_manifest(str(tmp_path / "o")).splits["train"].num_examples == 5000


def test_split_names_from_file_names_and_flags():
    assert split_names(["a/bibtex-train.arff", "a/bibtex-test.arff"]) == ["train", "test"]
    assert split_names(["x_valid.csv", "x_training.csv", "x_test.csv"]) == ["eval", "train", "test"]
    assert split_names(["data.svm"]) == ["train"]
    assert split_names(["d/val.npz", "d/train.npz"]) == ["eval", "train"]
    assert split_names(["interval.csv"]) == ["train"]  # "val" only as a word
    assert split_names(["a.csv", "b.csv"], ["train", "holdout"]) == ["train", "holdout"]
    for paths, given, message in [
        (["a-train.csv", "b-train.csv"], None, "already comes from a-train.csv"),
        (["a.csv", "b-test.csv"], None, "cannot tell the split"),
        (["train_test.csv"], None, "matches splits train and test"),
        (["a.csv"], ["train", "test"], "2 names for 1"),
        (["a.csv", "b.csv"], ["train", "train"], "already comes from a.csv"),
        (["a.csv"], ["tr/ain"], "bad split name"),
    ]:
        with pytest.raises(DataError, match=message):
            split_names(paths, given)
