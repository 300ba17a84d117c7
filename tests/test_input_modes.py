"""Input modes (trainer/inputs.py, data.input_mode): in host and device memory every epoch visits every example
of the train split exactly once, in an order of its own that the seed fixes; a resumed epoch continues with the
batch it stopped at, so a run killed with SIGKILL resumes to the weights of an uninterrupted one; the held-out
examples stay out; device mode keeps one part of the data on each replica's device and trains as host memory
does; auto streams when the share exceeds the budget; a bad mode is a one-line config error."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from conftest import (REPO_ROOT, assert_same_state, mirrored_backend, read_checkpoint, repo_env,
                      sigkill_after_first_checkpoint, train_in_process, train_two_workers)
from data_pipeline import manifest as mf
from data_pipeline import reader
from data_pipeline.errors import DataError
from trainer import cli, inputs
from trainer.backends import make_backend
from trainer.config import ConfigError, load_config

BATCH = 32  # 2400 train examples: 75 steps per epoch, no remainder
STEPS_PER_EPOCH = 75
SETS = ["model.hidden=[16]", "model.dropout=0.0", f"train.batch_size={BATCH}", "train.deterministic=true",
        "train.seed=7", "data.eval_split=''", "optimizer.decay=constant", "optimizer.warmup_steps=10",
        "checkpoint.every_seconds=0"]


def backend_for(name: str):
    return mirrored_backend() if name == "mirrored" else make_backend(name)


def config(*extra: str):
    return load_config(None, SETS + list(extra))


def row_ids(data) -> dict[bytes, int]:
    """Example index of each feature row of the loaded data (the rows of the tiny dataset are all different)."""
    ids = {row.tobytes(): i for i, row in enumerate(np.asarray(data.features, np.float32))}
    assert len(ids) == data.num_examples
    return ids


def epoch_examples(train_input, backend, ids, epoch: int, in_epoch: int = 0, steps: int = STEPS_PER_EPOCH):
    """The example indices the train steps of an epoch see from step ``in_epoch`` on, step after step (a
    step's replicas in replica order), through the same iterator and replica_batch the train function uses."""
    iterator = train_input.epoch(epoch, in_epoch)

    @tf.function
    def step_features(it):
        return backend.run(lambda element: train_input.replica_batch(element)[0], (next(it),))

    out = []
    for _ in range(steps - in_epoch):
        for x in backend.strategy.experimental_local_results(step_features(iterator)):
            out += [ids[row.tobytes()] for row in x.numpy()]
    return out


@pytest.mark.parametrize("mode", ["memory", "device"])
@pytest.mark.parametrize("distribution", ["one_device", "mirrored"])
def test_every_example_once_per_epoch_new_order_each_epoch_same_for_the_seed(tiny_data, mode, distribution):
    backend = backend_for(distribution)
    cfg = config(f"data.input_mode={mode}")
    train_input = inputs.make_training_input(cfg, backend, tiny_data, BATCH)
    assert train_input.mode == mode
    options = inputs.training_reader_options(cfg, mf.read_manifest(tiny_data))
    ids = row_ids(inputs.load_share(tiny_data, "train", backend, options))
    first, second = (epoch_examples(train_input, backend, ids, e) for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(len(ids)))  # every example exactly once
    assert first != second
    again = inputs.make_training_input(cfg, backend, tiny_data, BATCH)
    assert epoch_examples(again, backend, ids, 1) == second
    other_seed = inputs.make_training_input(config(f"data.input_mode={mode}", "train.seed=8"), backend, tiny_data,
                                            BATCH)
    assert epoch_examples(other_seed, backend, ids, 1) != second
    # Resumed at step 40 of epoch 1: the batches the uninterrupted epoch took from step 40 on.
    assert epoch_examples(again, backend, ids, 1, in_epoch=40) == second[40 * BATCH:]


@pytest.mark.parametrize("mode", ["memory", "device"])
def test_held_out_examples_stay_out_of_training(tiny_data, mode):
    backend = make_backend("one_device")
    cfg = config(f"data.input_mode={mode}", "data.validation_fraction=0.25")
    options = inputs.training_reader_options(config(), mf.read_manifest(tiny_data))
    everything = inputs.load_share(tiny_data, "train", backend, options)
    ids = row_ids(everything)
    held_out = reader.make_dataset(tiny_data, "train", 500, options=reader.ReaderOptions(
        shuffle=False, repeat=False, holdout_fraction=0.25, holdout="only"))
    held = {ids[row.tobytes()] for x, _ in held_out for row in x.numpy()}
    train_input = inputs.make_training_input(cfg, backend, tiny_data, BATCH)
    steps = (len(ids) - len(held)) // BATCH
    seen = epoch_examples(train_input, backend, ids, 0, steps=steps)
    assert 400 < len(held) < 800 and len(seen) == len(set(seen)) == steps * BATCH
    assert not held & set(seen)
    assert len(set(seen)) > len(ids) - len(held) - BATCH  # all the others but at most a partial batch


# --- Resume after SIGKILL ------------------------------------------------------------------------------------------

TOTAL = 400  # 5 epochs and 25 steps; checkpoints every 40 steps fall inside epochs
RESUME_SETS = SETS + ["data.input_mode=memory", f"train.max_steps={TOTAL}", "train.epochs=10",
                      "checkpoint.every_steps=40", "checkpoint.keep=3", "train.log_every_steps=200"]


@pytest.mark.parametrize("distribution", ["one_device", "mirrored"])
def test_memory_mode_sigkill_then_resume_equals_one_run(tiny_data, tmp_path, distribution):
    sets = RESUME_SETS + [f"train.distribution={distribution}"]
    full, _ = train_in_process(load_config(None, sets), tiny_data, tmp_path / "full", backend=backend_for(distribution))
    assert full.step == TOTAL
    model_dir = tmp_path / "killed"
    args = ["train", "--data", tiny_data, "--model-dir", model_dir] + [a for s in sets for a in ("--set", s)]
    killed_at = sigkill_after_first_checkpoint(args, model_dir, tmp_path / "log", env={"MLT_LOGICAL_CPUS": "2"},
                                               timeout=180)
    assert 0 < killed_at < TOTAL, killed_at
    resumed, messages = train_in_process(load_config(None, sets), tiny_data, model_dir,
                                         backend=backend_for(distribution))
    assert any(f"resuming at step {killed_at} of {TOTAL}" in m for m in messages), messages[:3]
    assert resumed.step == TOTAL
    assert_same_state(read_checkpoint(model_dir), read_checkpoint(tmp_path / "full"), rtol=1e-6, atol=1e-7)


# --- Device mode -----------------------------------------------------------------------------------------------

def test_device_mode_puts_one_part_on_each_replicas_device(tiny_data):
    backend = mirrored_backend()
    train_input = inputs.make_training_input(config("data.input_mode=device"), backend, tiny_data, BATCH)
    for (tensors, permutation, n, _), device in zip(train_input.parts, backend.local_devices):
        assert n == 1200
        assert {t.device for t in tensors.values()} == {device}
        assert permutation.device == device


def test_device_mode_trains_as_host_memory_does(tiny_data, tmp_path):
    """One replica: device mode gathers on the device the batches host memory mode draws by tf.data, so the
    two runs end with the same weights; under mirrored it trains with an evaluation and a resume."""
    for mode in ("memory", "device"):
        result, messages = train_in_process(config(f"data.input_mode={mode}", "train.max_steps=40"), tiny_data,
                                            tmp_path / mode, backend=make_backend("one_device"))
        assert result.step == 40
    assert_same_state(read_checkpoint(tmp_path / "memory"), read_checkpoint(tmp_path / "device"), rtol=1e-6, atol=1e-7)

    sets = ["data.input_mode=device", "data.validation_fraction=0.2", "train.eval_every_steps=20",
            "metrics.per_label_summaries=false", "optimizer.learning_rate=0.01"]
    first, _ = train_in_process(config(*sets, "train.max_steps=30"), tiny_data, tmp_path / "m", mirrored_backend())
    second, messages = train_in_process(config(*sets, "train.max_steps=60"), tiny_data, tmp_path / "m",
                                        mirrored_backend())
    assert (first.step, second.step) == (30, 60)
    assert any("mirrored: 2 replica(s)" in m and "resuming at step 30" in m for m in messages), messages[:3]
    eval_losses = [float(m.split(" loss ")[1].split()[0]) for m in messages if m.startswith("eval step")]
    assert len(eval_losses) == 2 and eval_losses[1] < eval_losses[0], eval_losses  # steps 40, 60


# --- auto, the budget, bad values ------------------------------------------------------------------------------

def test_auto_streams_when_the_share_exceeds_the_budget(tiny_data):
    backend = make_backend("one_device")
    assert inputs.resolve_mode(config(), backend, tiny_data) == "memory"  # 0.3 MiB, budget 4096 MiB
    assert inputs.resolve_mode(config("data.memory_budget_mib=0.25"), backend, tiny_data) == "stream"
    train_input = inputs.make_training_input(config("data.memory_budget_mib=0.25"), backend, tiny_data, BATCH)
    assert train_input.mode == "stream"
    assert inputs.resolve_mode(config("data.input_mode=device", "data.memory_budget_mib=0"), backend,
                               tiny_data) == "device"  # an explicit mode is taken as given
    # A split smaller than one batch streams (the reader repeats its examples); memory modes refuse it.
    assert inputs.resolve_mode(config("train.batch_size=4096"), backend, tiny_data) == "stream"
    with pytest.raises(ConfigError, match="data.input_mode: memory holds this worker's 2400 training examples"):
        inputs.make_training_input(config("data.input_mode=memory"), backend, tiny_data, 4096)


def test_bad_input_mode_is_a_one_line_config_error(tiny_data, tmp_path, capsys):
    for setting, key in (("data.input_mode=disk", "data.input_mode"), ("data.memory_budget_mib=-1",
                                                                     "data.memory_budget_mib")):
        code = cli.main(["train", "--data", tiny_data, "--model-dir", str(tmp_path / "m"), "--set", setting])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and key in err, err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("on_bad_features", ["fail", "skip"])
def test_non_finite_features_fail_the_load_or_are_dropped(tmp_path, on_bad_features):
    from test_bad_input import good_records, shard, write_records

    records = good_records()
    records[12][0][3] = np.nan
    data_dir = str(write_records(tmp_path / "d", records, shards=2))
    options = inputs.training_reader_options(config(f"data.on_bad_features={on_bad_features}"),
                                             mf.read_manifest(data_dir))
    backend = make_backend("one_device")
    if on_bad_features == "fail":
        with pytest.raises(DataError, match=f"{shard(data_dir, 0)} record 12: NaN/Inf feature value"):
            inputs.load_share(data_dir, "train", backend, options)
    else:
        data = inputs.load_share(data_dir, "train", backend, options)
        expected = np.stack([r[0] for i, r in enumerate(records) if i != 12]).astype(np.float32)
        np.testing.assert_array_equal(data.features, expected)
        assert data.label_indices.tolist() == [i % 5 for i in range(60) if i != 12]


# --- Several processes -------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["memory", "device"])
def test_multi_worker_memory_modes(tiny_data, tmp_path, mode):
    """Two local workers, each holding its share: both finish with identical weights."""
    args = ["train", "--data", tiny_data, "--model-dir", tmp_path / "model", "--distribution", "multi_worker",
            "--set", "model.hidden=[16]", "--set", "train.batch_size=64", "--set", "train.max_steps=40",
            "--set", "checkpoint.every_steps=15", "--set", "checkpoint.every_seconds=0",
            "--set", "train.eval_every_steps=20", "--set", f"data.input_mode={mode}"]
    (chief, _), dumps = train_two_workers(args, tmp_path)
    assert "multi_worker: 2 replica(s), 2 worker(s)" in chief and "trained 40 steps" in chief
    with np.load(dumps / "weights-0.npz") as a, np.load(dumps / "weights-1.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _horovod_env():
    for candidate in (os.environ.get("MLT_HOROVOD_ENV"), REPO_ROOT / ".venv-horovod"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "horovodrun")):
            return str(candidate)
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError("CI: no Horovod environment found (run scripts/install_horovod.sh first)")
    pytest.skip("no Horovod environment (scripts/install_horovod.sh builds one)")


@pytest.mark.slow
@pytest.mark.horovod
def test_horovod_device_mode(tiny_data, tmp_path):
    """horovodrun -np 2 --gloo in device mode: both ranks finish with identical weights, after an evaluation."""
    env_dir = _horovod_env()
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    cmd = [os.path.join(env_dir, "bin", "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
           os.path.join(env_dir, "bin", "python"), "-m", "trainer", "train", "--data", tiny_data,
           "--model-dir", str(tmp_path / "model"), "--distribution", "horovod", "--max-steps", "30",
           "--set", "model.hidden=[16]", "--set", "train.batch_size=64", "--set", "train.eval_every_steps=15",
           "--set", "data.input_mode=device", "--set", "checkpoint.every_seconds=0"]
    env = {k: v for k, v in repo_env(MLT_DUMP_WEIGHTS=str(dumps / "weights-{worker}.npz")).items()
           if not k.startswith(("HOROVOD_", "OMPI_", "PMI_"))}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "data.input_mode device" in out and "trained 30 steps" in out, out[-4000:]
    with np.load(dumps / "weights-0.npz") as a, np.load(dumps / "weights-1.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)



def write_packed(path, x, labels, feature_dtype: str) -> str:
    from data_pipeline.writer import DatasetWriter

    with DatasetWriter(str(path), x.shape[1], 4, encoding=mf.PACKED_DENSE, feature_dtype=feature_dtype,
                       block_size=16) as w:
        w.write_split("train", ((row, lab, f"row {i}") for i, (row, lab) in enumerate(zip(x, labels))), len(x), 2)
    return str(path)


@pytest.mark.parametrize("mode", ["stream", "memory", "device"])
def test_half_precision_data_reaches_the_step_in_its_stored_dtype_and_trains_as_float32(tmp_path, mode):
    """Packed float16 features travel as float16 (half the bytes to the device) and the replica step casts them:
    the weights equal those of the same values stored as float32."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, 8)).astype(np.float16).astype(np.float32)  # values float16 holds exactly
    labels = [list(np.flatnonzero(row[:4] > 0.3)) for row in x]
    half = write_packed(tmp_path / "f16", x, labels, "float16")
    single = write_packed(tmp_path / "f32", x, labels, "float32")
    cfg = config(f"data.input_mode={mode}", "train.max_steps=12", "train.batch_size=16")
    backend = make_backend("one_device")
    train_input = inputs.make_training_input(cfg, backend, half, 16)
    features, _ = train_input.replica_batch(next(train_input.epoch(0, 0)))
    assert features.dtype == tf.float16
    train_in_process(cfg, half, tmp_path / "m16")
    train_in_process(cfg, single, tmp_path / "m32")
    assert_same_state(read_checkpoint(tmp_path / "m16"), read_checkpoint(tmp_path / "m32"), rtol=0, atol=0)

