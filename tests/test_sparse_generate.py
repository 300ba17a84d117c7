"""The generator's sparse bag-of-words mode (``generate --sparse``): written through the command line, read back
through the reader as tf.SparseTensor batches; the statistics the mode promises (K non-zeros per document, Zipf
word and label frequencies, labels predictable from the words) measured on what was read."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import cli
from data_pipeline import manifest as mf
from data_pipeline.reader import ReaderOptions, make_dataset

F, L, K, N = 400, 16, 20, 3000
ORDERED = ReaderOptions(shuffle=False, repeat=False, deterministic=True, cycle_length=1, sparse_output=True)


def read_sparse(data_dir, split):
    """The split as (dense x from the SparseTensor batches, y), and the non-zeros of every row."""
    xs, ys, nnz = [], [], []
    for x, y in make_dataset(str(data_dir), split, 256, options=ORDERED):
        assert isinstance(x, tf.SparseTensor)
        nnz.append(np.bincount(x.indices[:, 0].numpy(), minlength=int(x.dense_shape[0])))
        xs.append(tf.sparse.to_dense(x).numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(nnz)


@pytest.fixture(scope="module")
def bag_of_words(tmp_path_factory):
    out = tmp_path_factory.mktemp("bow") / "d"
    assert cli.main(["generate", "--sparse", "--nonzeros", str(K), "--out", str(out), "--examples", str(N),
                     "--features", str(F), "--labels", str(L), "--shards", "2", "--split-eval", "0.25"]) == 0
    return out


def rank_auc(scores, positive):
    ranks = np.argsort(np.argsort(scores)) + 1
    p = positive.sum()
    return (ranks[positive].sum() - p * (p + 1) / 2) / (p * (len(scores) - p))


def test_sparse_documents_have_k_words_and_zipf_frequencies(bag_of_words):
    m = mf.read_manifest(str(bag_of_words))
    assert (m.feature_encoding, m.num_features, m.num_labels) == (mf.PACKED_SPARSE, F, L)
    x, y, nnz = read_sparse(bag_of_words, "train")
    assert len(x) == N * 3 // 4 and (nnz == K).all() and (np.count_nonzero(x, axis=1) == K).all()
    assert m.splits["train"].feature_values == K * len(x)
    assert (x[x != 0] >= 1).all()  # 1 + log(times drawn)
    doc_freq = (x != 0).mean(axis=0)
    # Zipf: frequency falls with the rank; the most frequent words are in most documents, the tail in few.
    by_rank = [doc_freq[a:b].mean() for a, b in ((0, 5), (5, 50), (50, 200), (200, F))]
    assert doc_freq[0] > 0.5 and by_rank == sorted(by_rank, reverse=True) and by_rank[0] > 10 * by_rank[-1]
    label_freq = y.mean(axis=0)
    assert label_freq[0] > label_freq[3] > label_freq[-1] > 0
    assert 3.0 < y.sum(axis=1).mean() < 5.0 and (y.sum(axis=1) >= 1).all()


def test_labels_are_predictable_from_the_words(bag_of_words):
    xt, yt, _ = read_sparse(bag_of_words, "train")
    xe, ye, _ = read_sparse(bag_of_words, "eval")
    w, *_ = np.linalg.lstsq(np.c_[xt, np.ones(len(xt))], yt, rcond=None)  # a linear model, least squares
    scores = np.c_[xe, np.ones(len(xe))] @ w
    aucs = [rank_auc(scores[:, j], ye[:, j] > 0) for j in range(L) if 5 <= ye[:, j].sum() <= len(ye) - 5]
    assert len(aucs) >= L // 2 and np.mean(aucs) > 0.9, aucs


def test_sparse_documents_do_not_depend_on_the_layout(bag_of_words, tmp_path):
    out = tmp_path / "e"
    assert cli.main(["generate", "--sparse", "--nonzeros", str(K), "--out", str(out), "--examples", str(N),
                     "--features", str(F), "--labels", str(L), "--shards", "3", "--split-eval", "0.25",
                     "--layout", "example"]) == 0
    assert mf.read_manifest(str(out)).feature_encoding == mf.SPARSE
    for a, b in zip(read_sparse(bag_of_words, "eval"), read_sparse(out, "eval")):
        np.testing.assert_array_equal(a, b)


def test_bad_nonzeros_is_one_line(tmp_path, capsys):
    assert cli.main(["generate", "--sparse", "--nonzeros", "0", "--out", str(tmp_path / "o"), "--examples", "10",
                     "--features", "5", "--labels", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["error: --nonzeros: must be >= 1 (got 0)"]
    assert not (tmp_path / "o").exists()
