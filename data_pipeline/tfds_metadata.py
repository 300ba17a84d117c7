"""TensorFlow Datasets metadata beside the manifest, so that ``tfds.builder_from_directory(dir)`` opens a dataset.

Written with TFDS's own ``tfds.folder_dataset.write_metadata`` (``dataset_info.json``, ``features.json``, and
for the label names ``y.labels.txt``), describing the records as they are, with our shard names as the file
template ``{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}``:

- one example per record: ``x`` (float32 [F]) or ``xi``/``xv`` (int64 / float32 [None]), and ``y`` a
  ``Sequence(ClassLabel)`` carrying the label names: a TFDS example is one of our examples;
- packed blocks: a TFDS example is one block record (TFDS cannot decode one record into several examples):
  ``n`` and ``id`` (int64), the byte strings ``y``, ``yp``, ``xi``, ``xv``, ``xp`` and ``x`` (bytes, or
  float32 [block_size * F] for float32 dense features), as data_pipeline/packed.py defines them. The split sizes
  TFDS reports are then blocks, not examples; the manifest keeps the example counts.

Where tensorflow_datasets does not import (the Horovod environment: TensorFlow 2.18's protobuf is older than
TFDS's metadata protos need), the dataset is written without it and a warning says so.
"""

from __future__ import annotations

import logging
import os
import re

from data_pipeline import manifest as mf

log = logging.getLogger(__name__)

FILE_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"  # matches mf.shard_name


def _features(m: mf.Manifest) -> dict:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def tensor(shape, dtype):
        return tfds.features.Tensor(shape=shape, dtype=dtype)

    if m.packed:
        feats = {mf.KEY_BLOCK_ROWS: tensor((), tf.int64), mf.KEY_BLOCK_ID: tensor((), tf.int64)}
        keys = [mf.KEY_LABELS, mf.KEY_LABEL_OFFSETS]
        if m.sparse:
            keys += [mf.KEY_SPARSE_INDEX, mf.KEY_SPARSE_VALUE, mf.KEY_SPARSE_OFFSETS]
        elif m.feature_dtype == "float32":
            feats[mf.KEY_DENSE] = tensor((m.block_size * m.num_features,), tf.float32)
        else:
            keys.append(mf.KEY_DENSE)
        feats.update({key: tensor((), tf.string) for key in keys})
        return feats
    if len(set(m.label_names)) == len(m.label_names) and not any("\n" in n for n in m.label_names):
        feats = {mf.KEY_LABELS: tfds.features.Sequence(tfds.features.ClassLabel(names=m.label_names))}
    else:  # ClassLabel needs distinct one-line names
        feats = {mf.KEY_LABELS: tensor((None,), tf.int64)}
    if m.feature_encoding == mf.SPARSE:
        feats[mf.KEY_SPARSE_INDEX] = tensor((None,), tf.int64)
        feats[mf.KEY_SPARSE_VALUE] = tensor((None,), tf.float32)
    else:
        feats[mf.KEY_DENSE] = tensor((m.num_features,), tf.float32)
    return feats


def write_tfds_metadata(directory: str, m: mf.Manifest, name: str) -> None:
    """Writes the TFDS metadata of the dataset ``m`` whose shards are in ``directory``.

    Args:
      directory: the dataset directory (shards written).
      m: its manifest (splits complete).
      name: the dataset's name for TFDS (made a valid identifier).
    """
    try:
        import tensorflow_datasets as tfds
        import tensorflow_datasets.core  # noqa: F401 - the lazy package import does not load its protos
    except Exception as e:  # noqa: BLE001 - e.g. the Horovod environment's protobuf is too old for it
        log.warning("no TFDS metadata written: tensorflow_datasets does not import here (%s: %s)",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return
    name = re.sub(r"\W+", "_", name).strip("_").lower() or "dataset"
    template = tfds.core.ShardedFileTemplate(data_dir=directory, template=FILE_TEMPLATE, dataset_name=name,
                                             filetype_suffix="tfrecord")
    splits = []
    for split, info in m.splits.items():
        records = ([-(-n // m.block_size) for n in info.shard_lengths] if m.packed else list(info.shard_lengths))
        size = sum(os.path.getsize(os.path.join(directory, shard)) for shard in info.shards)
        splits.append(tfds.core.SplitInfo(name=split, shard_lengths=records, num_bytes=size,
                                          filename_template=template))
    what = (f"blocks of up to {m.block_size} examples (data_pipeline/packed.py)" if m.packed
            else "one example per record")
    tfds.folder_dataset.write_metadata(
        data_dir=directory, features=_features(m), split_infos=splits, filename_template=template,
        check_data=False, description=f"multilabel-trainer dataset ({m.feature_encoding}, {what}): "
                                      f"{m.num_features} features, {m.num_labels} labels. {m.source}")
