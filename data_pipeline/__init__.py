"""Datasets for multi-label training: TFRecord shards plus a manifest, writers, converters and the reader.

Knows nothing about models or distribution strategies; the trainer asks ``reader.make_dataset`` for batches.
"""
