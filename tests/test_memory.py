"""In-memory training data (data_pipeline/memory.py): a pipeline's share of a split read once into arrays, its
size known before reading, and batches from a fresh seeded permutation per epoch that resume exactly."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import memory
from data_pipeline.reader import ReaderOptions, make_dataset
from data_pipeline.writer import DatasetWriter

N, F, L = 500, 6, 5


def write(path, encoding=mf.PACKED_DENSE, feature_dtype="float32", shards=3):
    """N examples; feature 0 is the example's position in the split, so a batch names its examples."""
    rng = np.random.default_rng(0)
    x = np.where(rng.random((N, F)) < 0.5, rng.normal(size=(N, F)), 0).astype(np.float32)
    x[:, 0] = np.arange(N)
    labels = [sorted(rng.choice(L, size=rng.integers(0, 3), replace=False).tolist()) for _ in range(N)]
    sparse = encoding in mf.SPARSE_ENCODINGS
    with DatasetWriter(str(path), F, L, encoding=encoding, feature_dtype=feature_dtype, block_size=32) as w:
        w.write_split("train", (((np.flatnonzero(r), r[r != 0]) if sparse else r, lab, f"row {i}")
                                for i, (r, lab) in enumerate(zip(x, labels))), N, shards)
    return str(path), x, labels


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return write(tmp_path_factory.mktemp("mem") / "d")


def ids(batch) -> list[int]:
    x = batch[0]
    x = tf.sparse.to_dense(x) if isinstance(x, tf.SparseTensor) else x
    return x[:, 0].numpy().astype(int).tolist()


def test_load_split_holds_the_split_in_dataset_order_and_its_size_was_known_before(dense):
    d, x, labels = dense
    data = memory.load_split(d, "train")
    np.testing.assert_array_equal(data.features, x)
    assert data.features.dtype == np.float32
    got = [data.label_indices[a:b].tolist() for a, b in zip(data.label_offsets[:-1], data.label_offsets[1:])]
    assert got == labels
    assert memory.estimate_bytes(d, "train") == pytest.approx(data.nbytes, rel=1e-6, abs=16)


@pytest.mark.parametrize("encoding, feature_dtype", [(mf.PACKED_DENSE, "float16"), (mf.PACKED_SPARSE, "bfloat16"),
                                                     (mf.SPARSE, "float32"), (mf.DENSE, "float32")])
def test_other_encodings_load_in_their_stored_form(tmp_path, encoding, feature_dtype):
    d, x, labels = write(tmp_path / "d", encoding, feature_dtype)
    data = memory.load_split(d, "train")
    expected = tf.cast(tf.cast(x, getattr(tf, feature_dtype)), tf.float32).numpy()
    if encoding in mf.SPARSE_ENCODINGS:
        assert data.features is None and data.feature_values.dtype == getattr(tf, feature_dtype).as_numpy_dtype
        rows = np.repeat(np.arange(N), np.diff(data.feature_offsets))
        dense = np.zeros((N, F), np.float32)
        dense[rows, data.feature_indices] = data.feature_values.astype(np.float32)
        np.testing.assert_array_equal(dense, expected)
    else:
        assert data.features.dtype == getattr(tf, feature_dtype).as_numpy_dtype
        np.testing.assert_array_equal(data.features.astype(np.float32), expected)
    assert memory.estimate_bytes(d, "train") == pytest.approx(data.nbytes, rel=0.02)
    # The batches: float32 by default, the stored dtype or a SparseTensor on request.
    x0, y0 = next(iter(memory.make_memory_dataset(data, 7, shuffle=False)))
    np.testing.assert_array_equal(tf.sparse.to_dense(x0) if isinstance(x0, tf.SparseTensor) else x0, expected[:7])
    stored = next(iter(memory.make_memory_dataset(data, 7, stored_dtype=True,
                                                  sparse_output=encoding in mf.SPARSE_ENCODINGS)))[0]
    assert (stored.values if isinstance(stored, tf.SparseTensor) else stored).dtype == getattr(tf, feature_dtype)


def test_every_example_once_per_epoch_in_a_new_order_each_epoch_and_the_same_for_a_seed(dense):
    data = memory.load_split(dense[0], "train")
    per_epoch = -(-N // 64)
    ds = memory.make_memory_dataset(data, 64, seed=3, drop_remainder=False)
    batches = [ids(b) for b in ds.take(3 * per_epoch)]
    epochs = [sum(batches[e * per_epoch:(e + 1) * per_epoch], []) for e in range(3)]
    assert [len(b) for b in batches[:per_epoch]] == [64] * (per_epoch - 1) + [N % 64]
    for order in epochs:
        assert sorted(order) == list(range(N))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    again = [ids(b) for b in memory.make_memory_dataset(data, 64, seed=3, drop_remainder=False).take(per_epoch)]
    assert sum(again, []) == epochs[0]
    other = [ids(b) for b in memory.make_memory_dataset(data, 64, seed=4, drop_remainder=False).take(per_epoch)]
    assert sum(other, []) != epochs[0]
    # Epoch 2 on its own is the third epoch above; the batch function is the same on its own.
    alone = [ids(b) for b in memory.make_memory_dataset(data, 64, seed=3, epoch=2, repeat=False,
                                                        drop_remainder=False)]
    assert sum(alone, []) == epochs[2]
    perm = memory.epoch_permutation(3, 2, N)
    assert memory.batch_indices(perm, 1, 64).numpy().tolist() == epochs[2][64:128]


def test_resume_from_batch_k_gives_the_remaining_batches(dense):
    data = memory.load_split(dense[0], "train")
    full = [ids(b) for b in memory.make_memory_dataset(data, 48, seed=9, epoch=1).take(25)]  # crosses epochs
    assert len(full[0]) == 48
    for k in (1, 10, 17):
        resumed = [ids(b) for b in memory.make_memory_dataset(data, 48, seed=9, epoch=1, skip_batches=k).take(25 - k)]
        assert resumed == full[k:]


def test_labels_of_the_batches_are_the_examples_labels(dense):
    d, _, labels = dense
    data = memory.load_split(d, "train")
    for x, y in memory.make_memory_dataset(data, 100, seed=1, repeat=False, drop_remainder=False):
        for i, row in zip(ids((x, y)), y.numpy()):
            assert np.flatnonzero(row).tolist() == labels[i]


@pytest.mark.parametrize("pipelines, which", [(2, (0, 1)), (5, (3,))])  # by file; by example id (3 files)
def test_a_pipeline_loads_the_share_make_dataset_reads(dense, pipelines, which):
    d = dense[0]
    shares = []
    for p in which:
        ctx = tf.distribute.InputContext(pipelines, p, pipelines)
        data = memory.load_split(d, "train", ctx, holdout_fraction=0.2)
        streamed = sum((ids(b) for b in make_dataset(d, "train", 50, ctx, ReaderOptions(
            shuffle=False, repeat=False, deterministic=True, cycle_length=1, holdout_fraction=0.2))), [])
        assert data.features[:, 0].astype(int).tolist() == streamed
        assert memory.estimate_bytes(d, "train", ctx, holdout_fraction=0.2) == pytest.approx(data.nbytes, rel=0.35)
        shares.append(streamed)
    if len(which) == pipelines:
        held = memory.load_split(d, "train", holdout_fraction=0.2, holdout="only").features[:, 0].astype(int)
        assert sorted(sum(shares, []) + held.tolist()) == list(range(N))
