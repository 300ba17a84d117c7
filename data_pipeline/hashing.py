"""Feature hashing: feature ids or tokens of an open vocabulary mapped into a fixed number of buckets.

The bucket of a feature is ``Fingerprint64(key) mod N`` with ``key`` the UTF-8 bytes of the token, or of the
decimal form of an integer feature id (0-based, as the converter numbers features: LIBSVM indices after
``--index-base``, CSV / ARFF / NPZ feature columns by position), and Fingerprint64 the FarmHash fingerprint
TensorFlow computes in ``tf.strings.to_hash_bucket_fast`` (the hash of ``keras.layers.Hashing``; TensorFlow
guarantees it never changes). The same function is therefore available inside a serving graph. Values of
features that fall into one bucket are summed. Hashing is unsigned: a learned first layer gives every bucket
its own weights, so a random sign would not let it tell colliding features apart any better, and unsigned
buckets keep count and TF-IDF features non-negative (``model.input_transform: log1p`` needs that).

A dataset converted with ``--hash-features N`` records ``feature_hashing: {buckets: N, hash: ...}`` in its
manifest; ``hash_features(ids, values, manifest.feature_hashing)`` maps the raw features of a new example
(prediction input) the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline.errors import DataError

HASH_NAME = "farmhash_fingerprint64_mod_buckets"  # tf.strings.to_hash_bucket_fast of the key's UTF-8 bytes
MAX_BUCKETS = 2**31 - 1  # packed shards store feature indices as int32


@dataclasses.dataclass(frozen=True)
class HashSpec:
    """A feature hashing as recorded in a manifest: ``buckets`` (the dataset's feature count) and ``hash``."""

    buckets: int
    hash: str = HASH_NAME

    def check(self, where: str) -> None:
        """Raises DataError naming ``where`` unless this is a hashing this package computes."""
        if self.hash != HASH_NAME:
            raise DataError(f"{where}: unknown feature hash '{self.hash}' (this version computes {HASH_NAME})")
        if not 1 <= self.buckets <= MAX_BUCKETS:
            raise DataError(f"{where}: must be in [1, {MAX_BUCKETS}] (got {self.buckets})")


def _buckets_of_keys(keys: list[str], buckets: int) -> np.ndarray:
    import tensorflow as tf  # Lazily: argument errors should not wait for TensorFlow.

    if not keys:
        return np.zeros([0], np.int64)
    return tf.strings.to_hash_bucket_fast(tf.constant(keys, tf.string), buckets).numpy().astype(np.int64)


class _BucketCache:
    """Buckets of small integer ids (a table over 0..max id seen, grown by doubling up to _TABLE_IDS entries) and of
    other keys (a bounded dict), for one bucket count: one TensorFlow call per batch of new keys instead of one per
    example."""

    def __init__(self, buckets: int):
        self.buckets = buckets
        self.table = np.zeros([0], np.int64)
        self.keys: dict[str, int] = {}

    def ids(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and ids.min() < 0:
            raise DataError(f"feature hashing: negative feature id {int(ids.min())}")
        small = ids[ids < _TABLE_IDS]
        top = int(small.max()) + 1 if small.size else 0
        if top > self.table.size:
            size = min(max(top, 2 * self.table.size, 1024), _TABLE_IDS)
            new = _buckets_of_keys([str(i) for i in range(self.table.size, size)], self.buckets)
            self.table = np.concatenate([self.table, new])
        small = ids < self.table.size
        if small.all():
            return self.table[ids]
        out = np.empty(ids.size, np.int64)
        out[small] = self.table[ids[small]]
        out[~small] = self.strings([str(i) for i in ids[~small].tolist()])
        return out

    def strings(self, keys: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(k for k in keys if k not in self.keys))
        if missing:
            if len(self.keys) + len(missing) > _DICT_KEYS:  # bounded memory for an unbounded vocabulary
                self.keys.clear()
            self.keys.update(zip(missing, _buckets_of_keys(missing, self.buckets).tolist()))
        return np.fromiter((self.keys[k] for k in keys), np.int64, len(keys))


_TABLE_IDS = 1 << 22  # integer ids below this are looked up in a table (8 bytes each)
_DICT_KEYS = 1 << 20  # other keys remembered at most
_caches: dict[int, _BucketCache] = {}


def hash_feature_ids(ids_or_tokens, spec: HashSpec) -> np.ndarray:
    """The bucket of every feature: int64 [n] in [0, spec.buckets).

    Args:
      ids_or_tokens: non-negative integer feature ids (array-like) or tokens (str or bytes, UTF-8).
      spec: the dataset's HashSpec (``manifest.feature_hashing``).
    """
    cache = _caches.setdefault(spec.buckets, _BucketCache(spec.buckets))
    keys = np.asarray(ids_or_tokens).reshape(-1)
    if keys.dtype.kind in "iu":
        return cache.ids(keys.astype(np.int64))
    if keys.size == 0:
        return np.zeros([0], np.int64)
    return cache.strings([k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in keys.tolist()])


def hash_features(ids_or_tokens, values, spec: HashSpec) -> tuple[np.ndarray, np.ndarray]:
    """One example's features hashed: (bucket indices int64, sorted and distinct; float32 values, the sum of the
    values of the features in each bucket). The function ``predict`` applies to its input rows.

    Args:
      ids_or_tokens: the example's feature ids or tokens (see hash_feature_ids); a token may repeat.
      values: one value per id or token (e.g. 1.0 per token occurrence for a bag of words).
      spec: the dataset's HashSpec (``manifest.feature_hashing``).
    """
    values = np.asarray(values, np.float32).reshape(-1)
    buckets = hash_feature_ids(ids_or_tokens, spec)
    if buckets.size != values.size:
        raise DataError(f"feature hashing: {buckets.size} feature ids but {values.size} values")
    unique, inverse = np.unique(buckets, return_inverse=True)
    return unique, np.bincount(inverse, weights=values, minlength=unique.size).astype(np.float32)
