"""Datasets for multi-label training: TFRecord shards plus a manifest, writers, converters and the reader.

Knows nothing about models or distribution strategies; the trainer asks ``reader.make_dataset`` (streaming) or
``memory.load_split`` + ``memory.make_memory_dataset`` (data held in memory) for batches.
"""
