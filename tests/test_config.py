"""Config: every bad config is a one-line ConfigError naming the key (and the file), through load_config and
through the CLI (exit 2, one line on stderr, no traceback); good configs load, round-trip and override."""

from __future__ import annotations

import re
import textwrap

import pytest

from conftest import REPO_ROOT, mirrored_backend, run_trainer
from trainer import cli
from trainer import config as config_lib
from trainer.config import ConfigError, load_config


def write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# --- Good configs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(str(REPO_ROOT / "configs" / name))
    assert cfg.train.batch_size > 0


def test_layers_defaults_file_overrides_extra(tmp_path):
    path = write(tmp_path, """\
        model: {hidden: [8, 4]}
        train: {batch_size: 32, epochs: 2}
        """)
    cfg = load_config(path, ["train.epochs=5", "optimizer.learning_rate=0.01"], {"train.max_steps": 7,
                                                                                   "train.precision": None})
    assert cfg.model.hidden == [8, 4]
    assert cfg.train.batch_size == 32
    assert cfg.train.epochs == 5  # --set wins over the file
    assert cfg.train.max_steps == 7  # dedicated flags win over --set
    assert cfg.train.precision == "auto"  # a flag left out (None) changes nothing
    assert cfg.optimizer.learning_rate == 0.01
    assert cfg.optimizer.beta_1 == config_lib.OptimizerConfig().beta_1


def test_int_for_float_and_exponent_floats(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 -- no dot -- as a *string*; it is how people write learning rates.
    path = write(tmp_path, "optimizer: {learning_rate: 3e-4, weight_decay: 0}\n")
    cfg = load_config(path, ["loss.label_smoothing=1E-2"])
    assert cfg.optimizer.learning_rate == pytest.approx(3e-4)
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.loss.label_smoothing == pytest.approx(0.01)


def test_empty_section_means_defaults(tmp_path):
    # A section whose keys are all commented out is `None` in YAML: it means "the defaults".
    path = write(tmp_path, """\
        model:
          # hidden: [8]
        train:
          batch_size: 16
        """)
    cfg = load_config(path)
    assert cfg.model == config_lib.ModelConfig()
    assert cfg.train.batch_size == 16


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["model.hidden=[8,8]", "train.max_steps=3", "optimizer.clipnorm=1.5",
                             "loss.label_weights=[1, 2.5]"])
    path = str(tmp_path / "saved.yaml")
    config_lib.save_config(cfg, path)
    assert load_config(path) == cfg


# --- Bad configs: load_config ---------------------------------------------------------------------------------

BAD_FILES = [
    # (file text, substrings the one-line message must contain)
    ("train: {batchsize: 3}\n", ["unknown config key 'train.batchsize'", "did you mean 'train.batch_size'"]),
    ("modle: {hidden: [3]}\n", ["unknown config key 'modle'", "did you mean 'model'"]),
    ("train: {batch_size: '64'}\n", ["train.batch_size", "expected int", "'64'"]),
    ("train: {deterministic: 1}\n", ["train.deterministic", "expected bool"]),
    ("model: {hidden: 64}\n", ["model.hidden", "expected a list"]),
    ("model: {hidden: [64, x]}\n", ["model.hidden[1]", "expected int"]),
    ("train: 5\n", ["train", "expected a mapping"]),
    ("- 1\n- 2\n", ["expected a mapping at the top level"]),
    ("train: {batch_size: [1, 2\n", ["not valid YAML"]),
    ("model: {dropout: 1.5}\n", ["model.dropout", "[0, 1)", "1.5"]),
    ("train: {batch_size: 0}\n", ["train.batch_size: must be > 0"]),
    ("optimizer: {name: sgd}\n", ["optimizer.name", "'sgd'", "adam, adamw"]),
    ("train: {precision: fp16}\n", ["train.precision", "mixed_float16"]),
    ("metrics: {num_bins: 5}\n", ["metrics.num_bins"]),
    ("optimizer: {beta_1: 1.0}\n", ["optimizer.beta_1"]),
    ("optimizer: {epsilon: 0}\n", ["optimizer.epsilon"]),
    ("train: {early_stopping_patience: 2, early_stopping_metric: macro_auc}\n",
     ["train.early_stopping_metric", "'macro_auc'", "macro_roc_auc"]),
]


VALUE_CHECKED = ("model.dropout", "train.batch_size:", "optimizer.name", "train.precision", "metrics.num_bins",
                 "optimizer.beta_1", "optimizer.epsilon", "train.early_stopping_metric")


@pytest.mark.parametrize("text,expected", BAD_FILES, ids=[t.strip().replace("\n", " ")[:40] for t, _ in BAD_FILES])
def test_bad_file_is_one_line_naming_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "\n" not in message
    if not any(part.startswith(VALUE_CHECKED) for part in expected):
        # Reading errors name the file; value checks run after file and --set overrides are merged, so
        # they name the key (and the value) only.
        assert message.startswith(path), message
    for part in expected:
        assert part in message, message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("override,expected", [
    ("train.batch_size", "expected KEY=VALUE"),
    ("model.hidden=[1,", "not valid YAML"),
    ("train.batch_sise=3", "did you mean 'train.batch_size'"),
    ("train.epochs=two", "train.epochs: expected int"),
    ("train=3", "train: expected a mapping"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate: must be > 0"),
])
def test_bad_override(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(")) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_batch_size_not_divisible_by_replicas(tiny_data, tmp_path):
    from trainer.train import train

    cfg = load_config(None, ["train.batch_size=63", "model.hidden=[4]"])
    with pytest.raises(ConfigError, match="train.batch_size: 63 is not divisible by the 2 replicas"):
        train(cfg, tiny_data, str(tmp_path / "m"), backend=mirrored_backend())


# --- Bad configs: the CLI -------------------------------------------------------------------------------------

def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("file_text,extra,expected", [
    ("train: {batchsize: 3}\n", [], "did you mean 'train.batch_size'"),
    ("train: {batch_size: [1, 2\n", [], "not valid YAML"),
    ("", ["--set", "train.batch_size"], "expected KEY=VALUE"),
    ("", ["--set", "model.dropout=2"], "model.dropout: must be in [0, 1)"),
    ("", ["--epochs", "0"], "train.epochs: must be > 0"),
    ("", ["--distribution", "mirrored", "--set", "train.batch_size=63"], "not divisible by the 2 replicas"),
])
def test_cli_bad_config_exits_2_with_one_line(tmp_path, tiny_data, capsys, file_text, extra, expected):
    config = write(tmp_path, file_text or "{}\n")
    code, err = _cli(capsys, "train", "--data", tiny_data, "--model-dir", str(tmp_path / "m"), "--config", config,
                     *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err, err


def test_cli_subprocess_missing_config_is_one_line_no_traceback(tmp_path, tiny_data):
    """The real entry point (``python -m trainer``): exit 2, one stderr line, no traceback, no model dir."""
    model_dir = tmp_path / "m"
    proc = run_trainer("train", "--data", tiny_data, "--model-dir", model_dir, "--config", tmp_path / "nope.yaml",
                       timeout=120)
    assert proc.returncode == 2, proc.stderr
    # TensorFlow's C++ start-up lines (absl/glog format) are not the trainer's output.
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not re.match(r"(WARNING: All log messages before absl|[IWEF]\d{4} )", line)]
    assert lines == [f"error: {tmp_path / 'nope.yaml'}: config file not found"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not model_dir.exists()


# --- One definition of each value: the defaults and the shipped configs ------------------------------------------

CONFIGS = REPO_ROOT / "configs"
DERIVED = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "default.yaml")


def _flat_file(path) -> dict:
    import yaml

    with open(path) as f:
        return config_lib.flatten(yaml.safe_load(f) or {})


def _named_changes(path) -> set[str]:
    """The keys the file's top comment names after "Changes from default.yaml:" (up to the next blank line)."""
    top = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        top.append(line.lstrip("#").strip())
    text = "\n".join(top)
    assert "Changes from default.yaml:" in text, f"{path.name}: its top comment names no changes"
    paragraph = text.split("Changes from default.yaml:", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"[a-z_]+\.[a-z_0-9]+", paragraph))


def test_default_yaml_is_the_dataclass_defaults():
    """configs/default.yaml writes out every key with the dataclass default: the two cannot drift apart, and
    training without --config trains what default.yaml says."""
    defaults = config_lib.flatten(config_lib.to_dict(config_lib.Config()))
    written = _flat_file(CONFIGS / "default.yaml")
    assert sorted(written) == sorted(defaults), "default.yaml must list every config key once"
    assert load_config(str(CONFIGS / "default.yaml")) == config_lib.Config()
    # The design's model: one 2048-2048-N MLP.
    assert (defaults["model.hidden"], defaults["model.ensemble"]) == ([2048, 2048], 1)


@pytest.mark.parametrize("name", DERIVED)
def test_shipped_config_changes_only_the_keys_its_top_comment_names(name):
    """Every other config is default.yaml plus the changes its top comment names: it sets exactly those keys,
    and each of them to a value other than the default (a key restated at its default would be a second
    definition of that value)."""
    path = CONFIGS / name
    named = _named_changes(path)
    defaults = config_lib.flatten(config_lib.to_dict(config_lib.Config()))
    resolved = config_lib.flatten(config_lib.to_dict(load_config(str(path))))
    changed = {k for k in defaults if resolved[k] != defaults[k]}
    assert set(_flat_file(path)) == named, f"{name}: sets {sorted(_flat_file(path))}, names {sorted(named)}"
    assert changed == named, f"{name}: differs from default.yaml in {sorted(changed)}, names {sorted(named)}"


def test_distribution_configs_are_the_default_model_distributed():
    for name, distribution in (("multi_gpu.yaml", "mirrored"), ("horovod.yaml", "horovod")):
        assert _named_changes(CONFIGS / name) == {"train.distribution", "train.batch_size"}, name
        assert load_config(str(CONFIGS / name)).train.distribution == distribution
    assert _named_changes(CONFIGS / "ensemble.yaml") == {"model.ensemble"}


def test_distribution_names_are_one_list():
    from trainer.backends import DISTRIBUTIONS

    assert config_lib.CHOICES["train.distribution"] == {"auto", *DISTRIBUTIONS}
    for name in DISTRIBUTIONS:
        assert load_config(None, [f"train.distribution={name}"]).train.distribution == name
    with pytest.raises(ConfigError, match="train.distribution: 'gloo' is not one of auto, "):
        load_config(None, ["train.distribution=gloo"])
