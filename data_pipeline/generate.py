"""Synthetic multi-label data that a model can learn.

Labels depend on the features through a hidden two-layer function (a linear part plus a ReLU part), so an
MLP can learn them but a constant predictor cannot. Label frequencies follow a long tail: label ``l`` is
positive for roughly ``head_rate / (l + 1) ** tail_exponent`` of the examples (never below a few examples),
as in real tag, diagnosis and product-attribute data. Shards are generated in parallel processes, in
fixed-size chunks (bounded memory), each chunk from a seed derived from (seed, split, chunk), so an example is
the same for a seed whatever the number of processes, shards or the layout.

The sparse mode (``BagOfWords``) writes documents as bags of words instead, in the sparse (CSR) encoding: word
(feature) and label frequencies follow Zipf's law, every label owns a few signature words, and a document with
label ``l`` contains some of ``l``'s signature words among Zipf-distributed background words, so the labels are
predictable from the features, as with text tagged by topic.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os

import numpy as np

from data_pipeline import manifest as mf
from data_pipeline.writer import DatasetWriter, ShardWriter

_CHUNK = 2048  # Examples generated at once (bounds memory to a few MB per process); each chunk has its own seed.
_CALIBRATION_ROWS = 20000


@dataclasses.dataclass
class HiddenFunction:
    """The function that maps features to labels. Derived from the seed alone."""

    w_linear: np.ndarray  # [F, L]
    w_hidden: np.ndarray  # [F, H]
    w_out: np.ndarray  # [H, L]
    thresholds: np.ndarray  # [L]: logit thresholds giving the long-tail frequencies.
    noise: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x @ self.w_hidden, 0.0)
        return x @ self.w_linear + h @ self.w_out

    @property
    def shape(self) -> tuple[int, int]:
        return self.w_linear.shape

    def chunk(self, seed: int, split_index: int, chunk: int) -> list:
        """The examples of one chunk (see chunk_examples) as [(features [F], label indices)]."""
        x, pos = chunk_examples(self, seed, split_index, chunk)
        return [(x[j], np.flatnonzero(pos[j])) for j in range(_CHUNK)]


@dataclasses.dataclass
class BagOfWords:
    """Sparse documents: words (features) and labels with Zipf-distributed frequencies, labels told by words.

    A document draws ``1 + Poisson(labels_per_example - 1)`` labels (Zipf: label ``l`` with probability
    proportional to ``1 / (l + 1)``), then ``words_per_label`` of each label's ``signature`` words, then
    background words (Zipf over the vocabulary) until it holds ``nonzeros`` distinct words; a word's value is
    ``1 + log(times drawn)`` (sublinear term frequency). Derived from the seed alone.
    """

    feature_cdf: np.ndarray  # [F] cumulative Zipf word probabilities
    label_cdf: np.ndarray  # [L] cumulative Zipf label probabilities
    signatures: np.ndarray  # [L, S] int32: the words each label draws from
    nonzeros: int
    labels_per_example: float = 4.0
    words_per_label: int = 5

    @property
    def shape(self) -> tuple[int, int]:
        return self.feature_cdf.size, self.label_cdf.size

    def chunk(self, seed: int, split_index: int, chunk: int) -> list:
        """The ``_CHUNK`` documents of one chunk, from their own seed: [((word indices, values), label indices)]."""
        rng = np.random.default_rng([seed, split_index, chunk, 1])
        counts = 1 + rng.poisson(self.labels_per_example - 1, _CHUNK)
        labels = np.searchsorted(self.label_cdf, rng.random(counts.sum()), side="right")
        picks = rng.integers(0, self.signatures.shape[1], (labels.size, self.words_per_label))
        signature = self.signatures[labels[:, None], picks]
        background = np.searchsorted(self.feature_cdf, rng.random((_CHUNK, 2 * self.nonzeros)), side="right")
        out, start = [], 0
        for j, n in enumerate(counts):
            draws = np.concatenate([signature[start:start + n].reshape(-1)[:self.nonzeros], background[j]])
            first = np.sort(np.unique(draws, return_index=True)[1])
            end = first[self.nonzeros] if first.size > self.nonzeros else draws.size  # the first K distinct words
            words, times = np.unique(draws[:end], return_counts=True)
            out.append(((words, 1.0 + np.log(times)), np.unique(labels[start:start + n])))
            start += n
        return out


def zipf_cdf(n: int, exponent: float = 1.0) -> np.ndarray:
    """Cumulative probabilities of ranks 0..n-1 with P(rank r) proportional to 1 / (r + 1) ** exponent."""
    cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** exponent)
    return cdf / cdf[-1]


def make_bag_of_words(num_features: int, num_labels: int, seed: int, nonzeros: int) -> BagOfWords:
    """The BagOfWords of a seed: 10 signature words per label, drawn uniformly from the vocabulary (so mostly
    rare words, which say more about a label than frequent ones)."""
    rng = np.random.default_rng([seed, 11])
    return BagOfWords(feature_cdf=zipf_cdf(num_features), label_cdf=zipf_cdf(num_labels),
                      signatures=rng.integers(0, num_features, (num_labels, 10)).astype(np.int32), nonzeros=nonzeros)


def target_frequencies(num_labels: int, num_examples: int, head_rate: float = 0.3,
                       tail_exponent: float = 1.0) -> np.ndarray:
    """Long-tail positive rates: a few frequent labels, many rare ones (at least ~5 examples each)."""
    rates = head_rate / np.arange(1, num_labels + 1) ** tail_exponent
    return np.clip(rates, min(head_rate, 5.0 / max(num_examples, 1)), head_rate)


def make_hidden_function(num_features: int, num_labels: int, num_examples: int, seed: int,
                         noise: float = 0.3) -> HiddenFunction:
    rng = np.random.default_rng([seed, 7])
    hidden = 64
    f = HiddenFunction(
        w_linear=rng.normal(size=(num_features, num_labels)).astype(np.float32) / np.sqrt(num_features),
        w_hidden=rng.normal(size=(num_features, hidden)).astype(np.float32) / np.sqrt(num_features),
        w_out=rng.normal(size=(hidden, num_labels)).astype(np.float32) / np.sqrt(hidden) * 1.5,
        thresholds=np.zeros(num_labels, np.float32), noise=noise)
    x = rng.normal(size=(_CALIBRATION_ROWS, num_features)).astype(np.float32)
    z = f.logits(x) + noise * rng.normal(size=(_CALIBRATION_ROWS, num_labels))
    freq = target_frequencies(num_labels, num_examples)
    f.thresholds = np.array([np.quantile(z[:, l], 1.0 - freq[l]) for l in range(num_labels)], np.float32)
    return f


@dataclasses.dataclass
class ShardSpec:
    """What a worker process needs to write one shard: examples ``start:stop`` of split ``split_index``."""

    path: str
    seed: int
    split_index: int
    start: int
    stop: int
    encoding: str
    feature_dtype: str
    block_size: int


def chunk_examples(fn: HiddenFunction, seed: int, split_index: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples ``chunk * _CHUNK`` to ``(chunk + 1) * _CHUNK`` of a split: (features [_CHUNK, F] float32, labels
    [_CHUNK, L] bool). Each chunk has its own random stream, so an example does not depend on the sharding."""
    rng = np.random.default_rng([seed, split_index, chunk])
    num_features, num_labels = fn.w_linear.shape
    x = rng.normal(size=(_CHUNK, num_features)).astype(np.float32)
    z = fn.logits(x) + fn.noise * rng.normal(size=(_CHUNK, num_labels))
    return x, z > fn.thresholds


def _write_shard(spec: ShardSpec, fn: HiddenFunction | BagOfWords) -> tuple[int, list[int], int]:
    """Generates and writes one shard (runs in a worker process). Returns (examples, label counts, values)."""
    num_features, num_labels = fn.shape
    w = ShardWriter(spec.path, num_features, num_labels, spec.encoding, feature_dtype=spec.feature_dtype,
                    block_size=spec.block_size, first_id=spec.start)
    try:
        for chunk in range(spec.start // _CHUNK, -(-spec.stop // _CHUNK)):
            examples = fn.chunk(spec.seed, spec.split_index, chunk)
            for i in range(max(spec.start, chunk * _CHUNK), min(spec.stop, (chunk + 1) * _CHUNK)):
                features, labels = examples[i - chunk * _CHUNK]
                w.write(features, labels, where=f"{spec.path} example {i}")
    finally:
        w.close()
    return w.num_examples, w.label_counts.tolist(), w.feature_values


class _InProcessPool(cf.Executor):
    """Runs submitted calls at once, in this process (the one-worker case)."""

    def submit(self, fn, *args, **kwargs):
        future = cf.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def generate(out_dir: str, num_examples: int, num_features: int, num_labels: int, num_shards: int,
             seed: int, split_eval: float = 0.0, overwrite: bool = False, workers: int | None = None,
             layout: str = "packed", feature_dtype: str = "float32", block_size: int = mf.DEFAULT_BLOCK_SIZE,
             sparse_nonzeros: int | None = None):
    """Writes a synthetic dataset directory.

    Args:
      out_dir: dataset directory to create.
      num_examples: total examples (train + eval).
      num_features, num_labels: shape of the data.
      num_shards: shards of the train split; the eval split gets a proportional number (at least 1).
      seed: decides every example written (the same examples whatever the layout).
      split_eval: fraction of the examples written to an "eval" split drawn from the same distribution.
      overwrite: replace an existing out_dir.
      workers: processes writing shards (default: CPU count).
      layout: "packed" (blocks of examples per record) or "example" (one example per record).
      feature_dtype: packed layout: stored feature dtype ("float32", "float16", "bfloat16").
      block_size: packed layout: examples per block record.
      sparse_nonzeros: None for dense features from a hidden function; K for bag-of-words documents of about K
        words (BagOfWords), stored in the sparse encoding.

    Returns:
      The Manifest written.
    """
    if not 0.0 <= split_eval < 1.0:
        raise ValueError(f"--split-eval must be in [0, 1), got {split_eval}")
    fn = (make_hidden_function(num_features, num_labels, num_examples, seed) if sparse_nonzeros is None else
          make_bag_of_words(num_features, num_labels, seed, sparse_nonzeros))
    num_eval = int(round(num_examples * split_eval))
    plan = [("train", num_examples - num_eval, num_shards)]
    if num_eval:
        plan.append(("eval", num_eval, max(1, int(round(num_shards * split_eval)))))
    # Small datasets are written in this process: starting worker processes (each imports TensorFlow)
    # costs more than it saves below a few tens of thousands of examples.
    workers = workers or (1 if num_examples < 50000 else os.cpu_count() or 1)
    with DatasetWriter(out_dir, num_features, num_labels, encoding=mf.encoding_for(layout, sparse=sparse_nonzeros is not None),
                       overwrite=overwrite, source=f"synthetic {type(fn).__name__} seed={seed}", feature_dtype=feature_dtype,
                       block_size=block_size) as writer:
        m = writer.manifest
        # spawn, not fork: forking a process that has TensorFlow loaded can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with (cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) if workers > 1
              else _InProcessPool()) as pool:
            futures = {}
            for split_index, (split, n, shards) in enumerate(plan):
                bounds = writer.shard_bounds(n, shards)
                shards = len(bounds) - 1
                futures[split] = [
                    pool.submit(_write_shard, ShardSpec(writer.shard_path(split, s, shards), seed, split_index,
                                                        int(bounds[s]), int(bounds[s + 1]), m.feature_encoding,
                                                        m.feature_dtype, m.block_size), fn)
                    for s in range(shards)]
            for split, fs in futures.items():
                results = [f.result() for f in fs]
                writer.add_split(split, [r[0] for r in results], np.sum([r[1] for r in results], axis=0),
                                 feature_values=sum(r[2] for r in results))
    return writer.manifest
