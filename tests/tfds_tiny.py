"""A tiny TensorFlow Datasets builder for the tests (no downloads): ``TinyTags`` holds every kind of feature and
label the tfds converter reads, made from fixed NumPy arrays the tests compare against (``source_rows``)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

TOPICS = ["sports", "politics", "science", "art"]  # the ClassLabel names
FLAGS = ["is_short", "is_long"]  # boolean label features
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
SPLIT_SIZES = {"train": 30, "test": 12}
VOCAB = 50  # token ids in [0, VOCAB)


def source_rows(split: str) -> list[dict]:
    """The examples of a split as the builder writes them (in generation order; TFDS reorders them)."""
    rng = np.random.default_rng(list(SPLIT_SIZES).index(split))
    rows = []
    for i in range(SPLIT_SIZES[split]):
        vec = np.where(rng.random(6) < 0.5, rng.normal(size=6), 0).astype(np.float32)
        topics = sorted(rng.choice(len(TOPICS), size=rng.integers(0, 3), replace=False).tolist())
        words = rng.choice(WORDS, size=rng.integers(1, 6)).tolist()
        rows.append({
            "vec": vec, "text": " ".join(words),
            "token_ids": rng.integers(0, VOCAB, size=rng.integers(0, 5)).astype(np.int64),
            "topics": topics,
            "multi_hot": np.isin(np.arange(len(TOPICS)), topics),
            "is_short": len(words) <= 2, "is_long": len(words) >= 4,
        })
    return rows


class TinyTags(tfds.core.GeneratorBasedBuilder):
    """Multi-label examples with dense, text and token-id features and three label representations."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "vec": tfds.features.Tensor(shape=(6,), dtype=np.float32),
            "text": tfds.features.Text(),
            "token_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "topics": tfds.features.Sequence(tfds.features.ClassLabel(names=TOPICS)),
            "multi_hot": tfds.features.Tensor(shape=(len(TOPICS),), dtype=np.bool_),
            **{flag: tfds.features.Tensor(shape=(), dtype=np.bool_) for flag in FLAGS},
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split):
        for i, row in enumerate(source_rows(split)):
            yield i, row


def prepare(data_dir) -> str:
    """Prepares TinyTags under ``data_dir``; returns the dataset directory (the one holding dataset_info.json)."""
    builder = TinyTags(data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(builder.data_dir)
