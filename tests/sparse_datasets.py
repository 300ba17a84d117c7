"""Sparse-encoded datasets for the tests of the sparse input path: LIBSVM text written from a seeded bag-of-words
model and converted by data_pipeline's libsvm converter (packed CSR or one example per record)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.converters import ConvertOptions, convert

F, L = 5000, 6  # features (over SPARSE_INPUT_MIN_FEATURES: auto takes the sparse path), labels


def bag_of_words(num_examples: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per example: 3-12 distinct feature ids (Zipf-like, so a batch shares many rows and never uses the tail),
    counts as values, and the labels a hidden linear function of them gives (multi-hot [N, L])."""
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(99).normal(size=(F, L))
    popularity = 1.0 / np.arange(1, F + 1) ** 1.1
    popularity[-300:] = 0.0  # never occur
    popularity /= popularity.sum()
    ids, values, labels = [], [], np.zeros((num_examples, L), np.float32)
    for i in range(num_examples):
        row = np.sort(rng.choice(F, size=rng.integers(3, 13), replace=False, p=popularity))
        vals = rng.integers(1, 4, size=row.size).astype(np.float32)
        ids.append(row)
        values.append(vals)
        labels[i] = (vals @ weights[row]) > 0.8
    return ids, values, labels


def libsvm_lines(ids, values, labels=None, index_base: int = 0) -> list[str]:
    """``l1,l2 idx:val ...`` lines (no labels: the line starts with a space)."""
    lines = []
    for i, (row, vals) in enumerate(zip(ids, values)):
        head = ",".join(str(j) for j in np.flatnonzero(labels[i])) if labels is not None else ""
        lines.append(head + " " + " ".join(f"{k + index_base}:{v:g}" for k, v in zip(row, vals)))
    return lines


def write_sparse_dataset(directory: Path, layout: str = "packed", num_train: int = 1600, num_eval: int = 320,
                         seed: int = 0) -> str:
    """A converted dataset with train and eval splits; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    inputs = []
    for split, n, s in (("train", num_train, seed), ("eval", num_eval, seed + 1)):
        ids, values, labels = bag_of_words(n, s)
        path = directory / f"{split}.libsvm"
        path.write_text("\n".join(libsvm_lines(ids, values, labels)) + "\n")
        inputs.append(str(path))
    out = directory / f"data-{layout}"
    convert(ConvertOptions(format="libsvm", inputs=tuple(inputs), out=str(out), splits=("train", "eval"), shards=4,
                           layout=layout, block_size=32, num_features=F, num_labels=L))
    return str(out)
