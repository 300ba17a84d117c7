"""Training of multi-label classifiers: config, model, loss, backends, loop, checkpoints, metrics, export.

Reads data only through data_pipeline.reader; knows nothing about file formats or Kubernetes.
"""
