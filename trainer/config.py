"""The one config system: typed dataclasses, loaded from a YAML file, with ``--set key=value`` overrides.

The dataclass defaults below are the defaults, defined nowhere else: they train the design's model (one
2048-2048-N MLP). configs/default.yaml spells every one of them out for reading (a test keeps the two equal),
and every other config file sets only the keys it changes, named in its top comment.

Everything is validated before any work starts: an unknown key, a value of the wrong type or an impossible
value is a ConfigError whose one line names the key (and the file). The resolved config is written into
the model directory, so a run can always be reproduced and resumed with the settings it started with.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Optional

import yaml

from trainer.backends import DISTRIBUTIONS
from trainer.metrics.compute import MAXIMISED_AGGREGATES


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the key."""


@dataclasses.dataclass
class ModelConfig:
    hidden: list[int] = dataclasses.field(default_factory=lambda: [2048, 2048])  # widths; depth = len
    activation: str = "relu"
    dropout: float = 0.5  # after each hidden layer
    input_dropout: float = 0.0  # on the features (helps sparse bag-of-words inputs)
    l2: float = 0.0  # L2 penalty on kernels (prefer optimizer.weight_decay with adamw)
    input_transform: str = "none"  # none | log1p | l2_normalize | log1p_l2 (bag-of-words: TF-IDF-like)
    output_bias: str = "prior"  # initial output biases: prior (log-odds of each label's training frequency) | zeros
    ensemble: int = 1  # independent MLPs averaged (mean probability); costs ensemble x the compute
    # sparse-encoded data fed as a tf.SparseTensor, never densified: auto (from 4096 features on) | true | false
    sparse_input: str = "auto"


@dataclasses.dataclass
class DataConfig:
    train_split: str = "train"
    # Evaluated during training (early stopping, threshold tuning): the validation records held out of
    # the train split when validation_fraction > 0; otherwise eval_split of --eval-data (or --data).
    # eval_split "auto" = "eval" if the dataset has one, else no evaluation during training (a "test"
    # split is never used for choices made during training unless named here explicitly).
    validation_fraction: float = 0.0
    eval_split: str = "auto"
    shuffle: bool = True  # off: files and records in dataset order (reproducing a run across backends)
    shuffle_buffer: int = 10000
    cycle_length: int = 8  # files read at once
    block_length: int = 16  # consecutive records taken from one file before moving to the next
    cache: bool = False
    on_bad_features: str = "fail"  # fail | skip
    # How training reads its data (README, "Input modes"): stream from the shards every epoch, or hold this
    # worker's share of the train split in host memory or on the replicas' devices; auto = memory when the
    # share fits memory_budget_mib (per worker), else stream.
    input_mode: str = "auto"  # auto | stream | memory | device
    memory_budget_mib: float = 4096.0


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "adamw"  # adam | adamw
    learning_rate: float = 1e-3  # at base_batch_size; scaled to the global batch by lr_scaling
    base_batch_size: int = 256
    lr_scaling: str = "linear"  # linear | sqrt | none
    weight_decay: float = 1e-4  # adamw only
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0  # final lr = learning_rate * min_lr_ratio
    clipnorm: Optional[float] = None
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7


@dataclasses.dataclass
class LossConfig:
    pos_weight: str = "none"  # none | manifest (neg/pos ratio from the manifest's label counts, capped)
    pos_weight_cap: float = 10.0
    label_weights: Optional[list[float]] = None  # explicit per-label loss weights
    label_smoothing: float = 0.0


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 256  # global batch, over all replicas and workers
    epochs: int = 30
    # Fewer epochs when train.epochs of them would train on more examples than this (at least one epoch): the
    # run length that scales from 10^3 to 10^7 records (trainer.train.run_length); None = always train.epochs.
    example_budget: Optional[int] = 10_000_000
    max_steps: Optional[int] = None  # stops earlier than epochs
    distribution: str = "auto"  # auto | one of trainer.backends.DISTRIBUTIONS
    precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16
    jit_compile: bool = False
    steps_per_call: int = 10  # training steps per tf.function call (fewer Python round trips)
    log_every_steps: int = 100
    eval_every_steps: int = 0  # 0 = at the end of every epoch
    seed: int = 0
    deterministic: bool = False  # deterministic ops and input order (exact resume, reproducible tests)
    early_stopping_patience: int = 0  # evaluations without improvement of early_stopping_metric; 0 = off
    early_stopping_metric: str = "macro_pr_auc"


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 1000
    every_seconds: float = 600.0
    keep: int = 3


@dataclasses.dataclass
class MetricsConfig:
    num_bins: int = 200  # threshold histogram resolution (memory: labels x bins); fewer when over the budget
    histogram_budget_mib: float = 64.0  # metric state per replica; above ~20k labels num_bins shrinks to fit
    propensity_a: float = 0.55  # PSP@k / PSnDCG@k label propensities (Jain et al. 2016): A and B of
    propensity_b: float = 1.5  # 1/p = 1 + C (N_l + B)^-A; Wikipedia-LSHTC 0.5 / 0.4, Amazon 0.6 / 2.6
    per_label_summaries: bool = True  # per-label table (Labels dashboard), PR curves, worst/best labels
    per_label_scalars: bool = False  # also per_label/<metric>/<label> scalars: 5 tags per label
    pr_curve_labels: list[str] = dataclasses.field(default_factory=list)  # default: 10 from head to tail
    num_worst_labels: int = 10  # rows of the worst / best labels tables
    min_support: int = 10  # evaluation positives a label needs to be ranked worst / best
    tune_thresholds: bool = True
    min_positives_for_threshold: int = 5


@dataclasses.dataclass
class HorovodConfig:
    fp16_compression: bool = False


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    horovod: HorovodConfig = dataclasses.field(default_factory=HorovodConfig)


CHOICES = {  # allowed values of the keys that take one of a few names
    "model.activation": {"relu", "gelu", "swish", "tanh"},
    "model.input_transform": {"none", "log1p", "l2_normalize", "log1p_l2"},
    "model.output_bias": {"prior", "zeros"},
    "model.sparse_input": {"auto", "true", "false"},
    "data.on_bad_features": {"fail", "skip"},
    "data.input_mode": {"auto", "stream", "memory", "device"},
    "optimizer.name": {"adam", "adamw"},
    "optimizer.lr_scaling": {"linear", "sqrt", "none"},
    "optimizer.decay": {"cosine", "linear", "constant"},
    "loss.pos_weight": {"none", "manifest"},
    "train.distribution": {"auto", *DISTRIBUTIONS},
    "train.precision": {"auto", "float32", "mixed_float16", "mixed_bfloat16"},
    # Aggregates of trainer.metrics.compute that grow when the model gets better (EarlyStopping maximises;
    # "loss" is minimised). Checked here: a typo used to be a KeyError at the first evaluation, N steps in.
    "train.early_stopping_metric": {"loss", *MAXIMISED_AGGREGATES},
}

# PyYAML implements YAML 1.1, which reads 1e-3 (no dot) as a string; accepted where a float is expected.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``, converting int to float where harmless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if tp is str and isinstance(value, bool):  # YAML reads true / false as booleans (model.sparse_input)
        return "true" if value else "false"
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if value is None:  # A section whose keys are all commented out: its defaults.
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of its keys, got {value!r}")
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def validate(cfg: Config) -> Config:
    """Checks values that types alone cannot; raises ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(sorted(allowed))}")
    checks = [
        ("model.hidden", all(w > 0 for w in cfg.model.hidden), "widths must be positive"),
        ("model.dropout", 0.0 <= cfg.model.dropout < 1.0, "must be in [0, 1)"),
        ("model.input_dropout", 0.0 <= cfg.model.input_dropout < 1.0, "must be in [0, 1)"),
        ("model.l2", cfg.model.l2 >= 0, "must be >= 0"),
        ("model.ensemble", 1 <= cfg.model.ensemble <= 32, "must be in [1, 32]"),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer >= 1, "must be >= 1"),
        ("data.cycle_length", cfg.data.cycle_length >= 1, "must be >= 1"),
        ("data.block_length", cfg.data.block_length >= 1, "must be >= 1"),
        ("data.memory_budget_mib", cfg.data.memory_budget_mib >= 0, "must be >= 0"),
        ("data.validation_fraction", 0 <= cfg.data.validation_fraction < 1, "must be in [0, 1)"),
        ("optimizer.learning_rate", cfg.optimizer.learning_rate > 0, "must be > 0"),
        ("optimizer.base_batch_size", cfg.optimizer.base_batch_size > 0, "must be > 0"),
        ("optimizer.weight_decay", cfg.optimizer.weight_decay >= 0, "must be >= 0"),
        ("optimizer.warmup_steps", cfg.optimizer.warmup_steps >= 0, "must be >= 0"),
        ("optimizer.min_lr_ratio", 0 <= cfg.optimizer.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("optimizer.clipnorm", cfg.optimizer.clipnorm is None or cfg.optimizer.clipnorm > 0, "must be > 0"),
        ("optimizer.beta_1", 0 <= cfg.optimizer.beta_1 < 1, "must be in [0, 1)"),
        ("optimizer.beta_2", 0 <= cfg.optimizer.beta_2 < 1, "must be in [0, 1)"),
        ("optimizer.epsilon", cfg.optimizer.epsilon > 0, "must be > 0"),
        ("loss.pos_weight_cap", cfg.loss.pos_weight_cap >= 1, "must be >= 1"),
        ("loss.label_smoothing", 0 <= cfg.loss.label_smoothing < 0.5, "must be in [0, 0.5)"),
        ("train.batch_size", cfg.train.batch_size > 0, "must be > 0"),
        ("train.epochs", cfg.train.epochs > 0, "must be > 0"),
        ("train.example_budget", cfg.train.example_budget is None or cfg.train.example_budget > 0, "must be > 0"),
        ("train.max_steps", cfg.train.max_steps is None or cfg.train.max_steps > 0, "must be > 0"),
        ("train.steps_per_call", cfg.train.steps_per_call >= 1, "must be >= 1"),
        ("train.log_every_steps", cfg.train.log_every_steps >= 1, "must be >= 1"),
        ("train.eval_every_steps", cfg.train.eval_every_steps >= 0, "must be >= 0"),
        ("train.early_stopping_patience", cfg.train.early_stopping_patience >= 0, "must be >= 0"),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps >= 0, "must be >= 0"),
        ("checkpoint.every_seconds", cfg.checkpoint.every_seconds >= 0, "must be >= 0"),
        ("checkpoint.keep", cfg.checkpoint.keep >= 1, "must be >= 1"),
        ("metrics.num_bins", 10 <= cfg.metrics.num_bins <= 10000, "must be in [10, 10000]"),
        ("metrics.min_support", cfg.metrics.min_support >= 0, "must be >= 0"),
        ("metrics.histogram_budget_mib", cfg.metrics.histogram_budget_mib > 0, "must be > 0"),
        ("metrics.propensity_a", cfg.metrics.propensity_a > 0, "must be > 0"),
        ("metrics.propensity_b", cfg.metrics.propensity_b > 0, "must be > 0"),
    ]
    for key, ok, why in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}: {why} (got {getattr(getattr(cfg, section), name)!r})")
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Parses ``key.sub=value`` (value in YAML syntax: 3, 0.1, true, [1024, 1024], adamw)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {text}: value is not valid YAML") from None
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _yaml_error(path: str, e: yaml.YAMLError) -> str:
    """One line naming the file, line and column of a YAML syntax error, and what the parser expected."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"{path} line {mark.line + 1} column {mark.column + 1}" if mark else path
    return f"{where}: not valid YAML ({problem}{', ' + context if context else ''})"


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                extra: dict[str, Any] | None = None) -> Config:
    """Builds the config: defaults, then the YAML file, then ``--set`` overrides, then ``extra``.

    Args:
      path: YAML file or None for the defaults.
      overrides: "dotted.key=value" strings.
      extra: dotted keys set by dedicated flags (e.g. {"train.epochs": 3}).

    Returns:
      A validated Config.

    Raises:
      ConfigError: naming the file and/or key at fault.
    """
    cfg = Config()
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(path, e)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            _merge(cfg, raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value))
    for key, value in (extra or {}).items():
        if value is not None:
            _merge(cfg, _nest(key, value))
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for hparams and logs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
