"""Per-label streaming metrics: TF-side additive state (:mod:`.state`), pure NumPy computation
(:mod:`.compute`), and the histogram bins both use (:mod:`.bins`).  Only the NumPy half is imported here so
that ``evaluate`` / reporting code can use it without importing TensorFlow."""

from trainer.metrics.compute import (  # noqa: F401
    MetricsResult,
    assign_buckets,
    compute_metrics,
    format_table,
    load_thresholds,
    per_label_csv,
    save_thresholds,
    tune_thresholds,
)
