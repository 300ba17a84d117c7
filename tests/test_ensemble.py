"""model.ensemble: K independent MLPs in one model, trained on their own losses, predicting their mean
probability -- on one device and under MirroredStrategy, through checkpoints, export and evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored_backend, read_checkpoint, train_in_process
from trainer import export, inference
from trainer.config import ConfigError, LossConfig, ModelConfig, load_config
from trainer.losses import MultiLabelLoss
from trainer.model import build_model, mean_probability_logits, model_flops_per_example


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def test_inference_logits_are_the_members_mean_probability():
    # No dropout: training=True then returns the members' logits deterministically.
    model = build_model(10, 4, ModelConfig(hidden=[8], dropout=0.0, ensemble=3), output_bias=np.zeros(4))
    x = tf.random.stateless_normal([6, 10], seed=[1, 2])
    members = model(x, training=True).numpy()
    assert members.shape == (6, 3, 4)
    assert not np.allclose(members[:, 0], members[:, 1])  # independently initialised members
    combined = model(x, training=False).numpy()
    assert combined.shape == (6, 4) and model.output_shape == (None, 4)
    np.testing.assert_allclose(sigmoid(combined), sigmoid(members).mean(axis=1), rtol=1e-5, atol=1e-6)


def test_mean_probability_logits_is_finite_and_exact_at_the_extremes():
    z = tf.constant([[[60.0, -60.0, 0.0]], [[60.0, 60.0, 0.0]], [[-120.0, -100.0, 0.0]]])  # [3, 1, 3]
    z = tf.transpose(z, [0, 2, 1])  # [3 examples, 3 members, 1 label]
    out = mean_probability_logits(z).numpy()[:, 0]
    assert np.all(np.isfinite(out))
    # (1 + 0 + 0.5) / 3 = 0.5 -> logit 0; all near 1 -> large positive; all near 0 -> large negative.
    assert out[0] == pytest.approx(0.0, abs=1e-5)
    p = (2 * sigmoid(60.0) + 0.5) / 3
    assert out[1] == pytest.approx(np.log(p / (1 - p)), rel=1e-4)
    assert out[2] == pytest.approx(np.log((np.exp(-100.0) + np.exp(-120.0) + 0.5) / 3 / (1 - 0.5 / 3)), rel=1e-4)


def test_member_logits_loss_is_the_mean_of_the_member_losses():
    rng = np.random.default_rng(0)
    y = tf.constant((rng.random((5, 4)) < 0.3).astype(np.float32))
    z = tf.constant(rng.normal(size=(5, 3, 4)).astype(np.float32))
    for cfg in (LossConfig(), LossConfig(pos_weight="manifest"), LossConfig(label_smoothing=0.1)):
        loss = MultiLabelLoss(cfg, 4, label_counts=[5, 1, 2, 3], num_examples=20)
        expected = np.mean([loss(y, z[:, k]).numpy() for k in range(3)], axis=0)
        np.testing.assert_allclose(loss(y, z).numpy(), expected, rtol=1e-6)
        assert loss(y, z).shape == (5,)


def test_flops_count_every_member():
    one = model_flops_per_example(100, 10, [20])
    assert model_flops_per_example(100, 10, [20], ensemble=3) == 3 * one == 3 * 6.0 * (100 * 20 + 20 * 10)


def test_ensemble_size_is_validated():
    with pytest.raises(ConfigError, match="model.ensemble"):
        load_config(None, ["model.ensemble=0"])


@pytest.mark.parametrize("distribution", ["one_device", "mirrored"])
def test_ensemble_trains_exports_and_serves_the_mean_probability(distribution, tiny_data, tmp_path):
    cfg = load_config(None, [f"train.distribution={distribution}", "model.hidden=[16]", "model.ensemble=2",
                             "model.dropout=0.0", "optimizer.warmup_steps=0",
                             "train.epochs=3", "train.batch_size=64", "train.max_steps=80",
                             "checkpoint.every_seconds=0",
                             "train.deterministic=true", "optimizer.learning_rate=0.01"])
    backend = mirrored_backend() if distribution == "mirrored" else None
    result, messages = train_in_process(cfg, tiny_data, tmp_path / "m", backend=backend)
    assert result.step == 80
    assert result.final_metrics["macro_roc_auc"] > 0.6, result.final_metrics

    # Two members with their own weights, both trained (moved away from each other and from the start).
    state = read_checkpoint(tmp_path / "m")
    kernels = [v for k, v in sorted(state.items()) if k.startswith("optimizer/_trainable_variables/")
               and v.shape == (32, 16)]
    assert len(kernels) == 2 and not np.allclose(kernels[0], kernels[1])

    # The export and the checkpoint predictor serve the members' mean probability.
    x = np.random.default_rng(1).normal(size=(7, 32)).astype(np.float32)
    serve, *_ = export.load_export(str(tmp_path / "m" / "export"))
    model = build_model(32, 8, cfg.model)
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(str(tmp_path / "m" / "checkpoints"))
                                             ).expect_partial()
    members = sigmoid(model(x, training=True).numpy()).mean(axis=1)  # no dropout in this config
    np.testing.assert_allclose(serve(x), members, rtol=1e-5, atol=1e-6)
    predict, *_ = inference.load_predictor(str(tmp_path / "m"), "checkpoint")
    np.testing.assert_allclose(predict(x), members, rtol=1e-5, atol=1e-6)


def test_resuming_with_another_ensemble_size_is_an_error(tiny_data, tmp_path):
    base = ["train.distribution=one_device", "model.hidden=[8]", "train.batch_size=64", "train.max_steps=2",
            "data.eval_split=''", "checkpoint.every_seconds=0"]
    train_in_process(load_config(None, base), tiny_data, tmp_path / "m")
    with pytest.raises(ConfigError, match="ensemble 1 -> 3"):
        train_in_process(load_config(None, base + ["model.ensemble=3", "train.max_steps=4"]), tiny_data,
                         tmp_path / "m")
