"""Packed datasets (one record holds a block of examples): every encoding round trip, the shuffle guarantee,
holdout and sharding by example id, exact resume, dataset order for evaluation, bad blocks.

Datasets are written through DatasetWriter from arrays the test makes, and read back through the same
make_dataset the trainer uses; expected values come from those arrays (and TensorFlow's own casts for the
half-precision dtypes).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import cli
from data_pipeline import manifest as mf
from data_pipeline import packed, validate
from data_pipeline.reader import ReaderOptions, explain_data_error, make_dataset
from data_pipeline.writer import DatasetWriter, default_label_names

ORDERED = dict(shuffle=False, repeat=False, deterministic=True, cycle_length=1)


def source_arrays(n, num_features, num_labels, seed=0, density=1.0):
    """Features (zeros where not dense) and label lists; row 1 has no labels, row 2 no features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, num_features)).astype(np.float32) * 3
    x[rng.random((n, num_features)) >= density] = 0
    x[2] = 0
    labels = [sorted(rng.choice(num_labels, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(n)]
    labels[1] = []
    return x, labels


def write(path, x, labels, num_labels, encoding=mf.PACKED_DENSE, shards=3, split="train", **kwargs):
    """Writes one split of (x, labels) through DatasetWriter; sparse encodings get each row's non-zeros."""
    sparse = encoding in mf.SPARSE_ENCODINGS

    def examples():
        for i, (row, lab) in enumerate(zip(x, labels)):
            idx = np.flatnonzero(row)
            yield ((idx, row[idx]) if sparse else row), lab, f"row {i}"

    with DatasetWriter(str(path), x.shape[1], num_labels, encoding=encoding, **kwargs) as w:
        w.write_split(split, examples(), len(x), shards)
    return str(path)


def read_all(data_dir, split="train", batch_size=64, input_context=None, **options):
    """The whole split through make_dataset: (features as NumPy (dense) or SparseTensor values, labels)."""
    xs, ys = [], []
    for x, y in make_dataset(data_dir, split, batch_size, input_context=input_context,
                             options=ReaderOptions(**{**ORDERED, **options})):
        xs.append(tf.sparse.to_dense(x) if isinstance(x, tf.SparseTensor) else x)
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def multi_hot(labels, num_labels):
    y = np.zeros((len(labels), num_labels), np.float32)
    for i, lab in enumerate(labels):
        y[i, lab] = 1
    return y


def rounded(x, dtype):
    """x as stored in ``dtype`` and read back, by TensorFlow's own cast (round to nearest even)."""
    return tf.cast(tf.cast(x, dtype), tf.float32).numpy()


# --- round trips --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, feature_dtype", [
    (mf.PACKED_DENSE, "float32"), (mf.PACKED_DENSE, "float16"), (mf.PACKED_DENSE, "bfloat16"),
    (mf.PACKED_SPARSE, "float32"), (mf.PACKED_SPARSE, "float16"), (mf.PACKED_SPARSE, "bfloat16")])
def test_writer_to_reader_round_trip(tmp_path, encoding, feature_dtype):
    """220 examples in blocks of 32 over 3 shards (each shard's last block short), batches of 50 with a short
    last one: the reader gives back the source arrays, half precision within its rounding."""
    sparse = encoding == mf.PACKED_SPARSE
    x, labels = source_arrays(220, 12, 9, density=0.3 if sparse else 1.0)
    d = write(tmp_path / "d", x, labels, 9, encoding, feature_dtype=feature_dtype, block_size=32)
    m = mf.read_manifest(d)
    assert (m.feature_encoding, m.feature_dtype, m.block_size) == (encoding, feature_dtype, 32)
    assert m.splits["train"].shard_lengths == [64, 96, 60]  # whole blocks in every shard but the last
    assert m.splits["train"].feature_values == (np.count_nonzero(x) if sparse else x.size)
    expected_x = x if feature_dtype == "float32" else rounded(x, getattr(tf, feature_dtype))
    assert feature_dtype == "float32" or not np.array_equal(expected_x, x)  # the rounding is there to see

    xr, yr = read_all(d, batch_size=50)
    assert xr.dtype == np.float32
    np.testing.assert_array_equal(xr, expected_x)
    np.testing.assert_array_equal(yr, multi_hot(labels, 9))

    # Stored dtype and sparse output: the same values, in the form asked for.
    stored = next(iter(make_dataset(d, "train", 50, options=ReaderOptions(**ORDERED, stored_dtype=True,
                                                                          sparse_output=sparse))))[0]
    values = stored.values if sparse else stored
    assert values.dtype == getattr(tf, feature_dtype)
    dense = tf.sparse.to_dense(stored) if sparse else stored
    np.testing.assert_array_equal(tf.cast(dense, tf.float32).numpy(), expected_x[:50])
    # inspect agrees, record by record.
    assert cli.main(["inspect", d]) == 0
    xv, lv = validate.read_split(d, "train")
    np.testing.assert_array_equal(xv, expected_x)
    assert [sorted(v.tolist()) for v in lv] == labels


def test_sparse_output_is_a_sparse_tensor_of_the_non_zeros(tmp_path):
    x, labels = source_arrays(100, 20, 5, density=0.2)
    d = write(tmp_path / "d", x, labels, 5, mf.PACKED_SPARSE, block_size=16)
    batch, _ = next(iter(make_dataset(d, "train", 100, options=ReaderOptions(**ORDERED, sparse_output=True))))
    assert isinstance(batch, tf.SparseTensor) and batch.dense_shape.numpy().tolist() == [100, 20]
    np.testing.assert_array_equal(batch.indices.numpy(), np.argwhere(x != 0))
    np.testing.assert_array_equal(batch.values.numpy(), x[x != 0])
    with pytest.raises(ValueError, match="sparse_output needs sparse features"):
        make_dataset(write(tmp_path / "dense", x, labels, 5), "train", 10, options=ReaderOptions(sparse_output=True))


def test_float16_overflow_is_a_one_line_error_naming_the_record(tmp_path, capsys):
    path = tmp_path / "big.csv"
    path.write_text("a,b,tag\n1,2,0\n3,70000,1\n")
    out = tmp_path / "o"
    args = ["convert", "--format", "csv", "--input", str(path), "--label-columns", "tag", "--out", str(out)]
    assert cli.main(args + ["--feature-dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path} line 3: feature value 70000 is too large for float16 (write float32 features: "
                   "--feature-dtype float32)"]
    assert not out.exists()
    assert cli.main(args + ["--feature-dtype", "bfloat16"]) == 0  # bfloat16 has float32's range
    np.testing.assert_array_equal(read_all(str(out))[0], [[1, 2], [3, 70144]])  # 70000 rounded to 8 bits


def test_datasets_of_earlier_versions_still_read(tmp_path):
    """One example per record (float list, raw bytes, sparse) and a manifest without the keys added since."""
    x, labels = source_arrays(40, 6, 4, density=0.5)
    for encoding in (mf.DENSE, mf.SPARSE):
        d = write(tmp_path / encoding, x, labels, 4, encoding)
        raw = json.loads((tmp_path / encoding / "manifest.json").read_text())
        for key in ("feature_dtype", "block_size"):
            raw.pop(key)
        for info in raw["splits"].values():
            info.pop("feature_values")
        (tmp_path / encoding / "manifest.json").write_text(json.dumps(raw))
        xr, yr = read_all(d, batch_size=16)
        np.testing.assert_array_equal(xr, x)
        np.testing.assert_array_equal(yr, multi_hot(labels, 4))


# --- mixing, epochs, holdout, sharding, resume ------------------------------------------------------------------

BLOCK = 16


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """1600 examples in blocks of 16 over 4 shards; feature 0 is the example's position (its id), feature 1
    its block, feature 2 its row in the block, feature 3 its shard."""
    n = 1600
    ids = np.arange(n)
    bounds = np.linspace(0, n // BLOCK, 5).round().astype(int) * BLOCK
    shard = np.searchsorted(bounds, ids, side="right") - 1
    x = np.stack([ids, ids // BLOCK, ids % BLOCK, shard], axis=1).astype(np.float32)
    labels = [[i % 7] for i in ids]
    return write(tmp_path_factory.mktemp("coded") / "d", x, labels, 7, shards=4, block_size=BLOCK)


def batch_ids(data_dir, batch_size, n, skip=0, input_context=None, epoch=0, **options):
    """The ids (feature 0) of the rows of ``n`` batches."""
    ds = make_dataset(data_dir, "train", batch_size, input_context, ReaderOptions(**options), epoch=epoch,
                      skip_batches=skip)
    return [x[:, 0].numpy().astype(int).tolist() for x, _ in ds.take(n)]


@pytest.mark.parametrize("mix, batch_size, holdout", [(16, 64, 0.0), (8, 64, 0.0), (8, 12, 0.0), (8, 64, 0.2)])
def test_every_batch_draws_from_the_promised_number_of_blocks(coded, mix, batch_size, holdout):
    """The guarantee of the reader's docstring: at least min(mix_blocks, ceil(B / 2)) blocks per batch with
    equal blocks; min(mix_blocks, ceil(B / 4)) when a holdout makes their sizes differ."""
    batches = batch_ids(coded, batch_size, 300, shuffle=True, repeat=True, mix_blocks=mix, seed=1,
                        holdout_fraction=holdout, drop_remainder=True)
    x = make_dataset(coded, "train", 10, options=ReaderOptions(**ORDERED)).take(1).get_single_element()[0].numpy()
    assert x[3].tolist() == [3, 0, 3, 0]  # the coding: id, block, row, shard
    blocks = [len({i // BLOCK for i in b}) for b in batches]
    promised = min(mix, -(-batch_size // (4 if holdout else 2)))
    assert min(blocks) >= promised, collections.Counter(blocks)
    shards = [len({int(np.searchsorted(np.linspace(0, 100, 5).round() * BLOCK, i, side="right")) for i in b})
              for b in batches]
    assert np.mean(shards) > 2  # rows of one batch come from several files too


def test_a_training_pass_holds_every_example_once_and_each_pass_has_its_own_order(coded):
    """repeat=True: the first 1600 rows are one pass over the data (no example twice, none missing), the next
    1600 the next pass, in another order; another epoch or seed gives another order, the same ones the same."""
    opts = dict(shuffle=True, repeat=True, seed=3, deterministic=True, drop_remainder=True)
    rows = sum(batch_ids(coded, 100, 32, **opts), [])
    assert sorted(rows[:1600]) == sorted(rows[1600:]) == list(range(1600))
    assert rows[:1600] != rows[1600:]
    assert sum(batch_ids(coded, 100, 16, **opts), []) == rows[:1600]
    assert sum(batch_ids(coded, 100, 16, epoch=1, **opts), []) != rows[:1600]
    assert sum(batch_ids(coded, 100, 16, **{**opts, "seed": 4}), []) != rows[:1600]


def test_holdout_is_chosen_per_example_id_whatever_the_reading(coded):
    cut = int(0.25 * packed.HOLDOUT_BUCKETS)
    expected = set(np.flatnonzero(packed.holdout_buckets(np.arange(1600)) < cut).tolist())
    assert 300 < len(expected) < 500
    ordered_only = sum(batch_ids(coded, 64, 100, holdout_fraction=0.25, holdout="only", **ORDERED), [])
    assert ordered_only == sorted(expected)  # evaluation order: dataset order
    shuffled_rest = sum(batch_ids(coded, 64, 100, holdout_fraction=0.25, shuffle=True, repeat=False), [])
    assert sorted(shuffled_rest) == sorted(set(range(1600)) - expected)
    for pipelines in (5,):  # fewer files than pipelines: sharded by example id
        parts = [sum(batch_ids(coded, 64, 100, input_context=tf.distribute.InputContext(pipelines, p, pipelines),
                               holdout_fraction=0.25, holdout="only", shuffle=True, repeat=False), [])
                 for p in range(pipelines)]
        assert sorted(sum(parts, [])) == sorted(expected)
        assert all(parts)


@pytest.mark.parametrize("pipelines", [2, 5])  # by file; by example id (fewer files than pipelines)
def test_input_pipelines_read_disjoint_shares_covering_the_split(coded, pipelines):
    parts = [sum(batch_ids(coded, 64, 100, input_context=tf.distribute.InputContext(pipelines, p, pipelines),
                           shuffle=True, repeat=False), []) for p in range(pipelines)]
    assert sorted(sum(parts, [])) == list(range(1600))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= (BLOCK * 25 if pipelines == 2 else 0)  # 5: every 5th example each


@pytest.mark.parametrize("holdout, pipelines", [(0.2, 1), (0.0, 5)])
def test_skip_batches_resumes_exactly_where_an_uninterrupted_read_would_be(coded, holdout, pipelines):
    opts = dict(shuffle=True, repeat=True, deterministic=True, seed=7, holdout_fraction=holdout, drop_remainder=True)
    ctx = tf.distribute.InputContext(pipelines, pipelines - 1, pipelines)
    full = batch_ids(coded, 48, 40, input_context=ctx, **opts)  # crosses the end of the first pass
    for skip in (1, 29):
        assert batch_ids(coded, 48, 40 - skip, skip=skip, input_context=ctx, **opts) == full[skip:]


def test_evaluation_reads_the_split_once_in_dataset_order_with_a_last_partial_batch(coded):
    sizes_and_ids = [(len(b), b) for b in batch_ids(coded, 300, 100, **ORDERED)]
    assert [s for s, _ in sizes_and_ids] == [300] * 5 + [100]
    assert sum((b for _, b in sizes_and_ids), []) == list(range(1600))
    two = [sum(batch_ids(coded, 300, 100, input_context=tf.distribute.InputContext(5, p, 5), **ORDERED), [])
           for p in (0, 4)]
    assert two == [list(range(0, 1600, 5)), list(range(4, 1600, 5))]


# --- bad blocks ---------------------------------------------------------------------------------------------------

def hand_written(d, blocks, num_features=3, num_labels=4, block_size=4):
    """A packed dataset of hand-made block records [(first id, label lists, dense rows)], one shard, with a
    manifest that believes them."""
    os.makedirs(d)
    name = mf.shard_name("train", 0, 1)
    counts, n = np.zeros(num_labels, np.int64), 0
    with tf.io.TFRecordWriter(os.path.join(d, name)) as f:
        for first, labels, rows in blocks:
            offsets = np.concatenate([[0], np.cumsum([len(lab) for lab in labels])])
            f.write(packed.encode_block(first, np.concatenate([np.zeros(0)] + [np.asarray(v) for v in labels]),
                                        offsets, "float32", block_size, dense=np.asarray(rows, np.float32)))
            for lab in labels:
                counts[[j for j in set(lab) if 0 <= j < num_labels]] += 1
            n += len(labels)
    mf.write_manifest(d, mf.Manifest(num_features, num_labels, default_label_names(num_labels), mf.PACKED_DENSE,
                                     {"train": mf.SplitInfo([name], [n], counts.tolist())}, block_size=block_size))
    return d, os.path.join(d, name)


def good_block(first):
    return first, [[0], [1, 2], [], [3]], np.arange(12, dtype=np.float32).reshape(4, 3) + first


@pytest.mark.parametrize("bad, message", [
    ((8, [[0], [9], [], [1]], np.zeros((4, 3))), "record 2: row 1: label index 9 out of range [0, 4)"),
    ((8, [[0], [1], [2], [3]], np.full((4, 3), np.nan)), "record 2 row 0: NaN/Inf feature value"),
    ((4, [[0], [1], [2], [3]], np.zeros((4, 3))), "record 2: example ids from 4 overlap the previous record's"),
])
def test_a_bad_block_is_one_line_naming_file_and_record(tmp_path, capsys, bad, message):
    d, shard = hand_written(str(tmp_path / "d"), [good_block(0), good_block(4), bad, good_block(12)])
    assert cli.main(["inspect", d]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: {shard} {message}"]
    if "overlap" in message:
        return  # the reader does not check ids: two examples with one id is a fault of the writer, not of reading
    with pytest.raises(tf.errors.OpError) as info:
        for _ in make_dataset(d, "train", 5, options=ReaderOptions(shuffle=True, repeat=False)):
            pass
    assert str(explain_data_error(d, "train", info.value)) == f"{shard} {message}"


def test_a_block_of_the_wrong_shape_is_named_by_the_reader_error(tmp_path):
    """Five rows in a dataset of blocks of four: the group's checks fail the batch; the explanation names it."""
    d, shard = hand_written(str(tmp_path / "d"), [good_block(0), good_block(4)])
    with tf.io.TFRecordWriter(shard) as f:  # rewritten: the second block holds five rows
        f.write(packed.encode_block(0, np.array([0, 1, 2, 3]), [0, 1, 2, 3, 4], "float32", 4, dense=np.zeros((4, 3))))
        f.write(packed.encode_block(4, np.array([0, 1, 2, 3, 0]), [0, 1, 2, 3, 4, 5], "float32", 5,
                                    dense=np.zeros((5, 3))))
    with pytest.raises(tf.errors.OpError) as info:
        list(make_dataset(d, "train", 3, options=ReaderOptions(**ORDERED)))
    assert str(explain_data_error(d, "train", info.value)) == f"{shard} record 1: block of 5 examples (block_size 4)"


def test_a_corrupt_packed_record_is_one_line_naming_file_and_record(tmp_path, capsys):
    x, labels = source_arrays(200, 5, 3)
    d = write(tmp_path / "d", x, labels, 3, shards=1, block_size=32)
    shard = os.path.join(d, mf.shard_name("train", 0, 1))
    data = bytearray(open(shard, "rb").read())
    record_length = int.from_bytes(data[:8], "little")
    second = 12 + record_length + 4  # where record 1 starts
    data[second + 12 + 200] ^= 0xFF  # inside record 1's data: only its CRC can tell
    open(shard, "wb").write(bytes(data))
    assert cli.main(["inspect", d]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {shard} record 1: truncated or corrupted TFRecord"), err
    with pytest.raises(tf.errors.OpError) as info:
        list(make_dataset(d, "train", 16, options=ReaderOptions(shuffle=True, repeat=False)))
    assert str(explain_data_error(d, "train", info.value)).startswith(f"{shard} record 1: truncated or corrupted")
