"""Run length that scales: the default trains train.epochs epochs on small datasets, train.example_budget examples
on middle-sized ones and one epoch on the largest; the learning-rate schedule spans the steps actually trained."""

from __future__ import annotations

import re

import pytest

from conftest import REPO_ROOT, train_in_process
from trainer.config import Config, load_config
from trainer.optimizers import WarmupDecay
from trainer.train import run_length


def default_plan(num_records: int) -> tuple[int, int]:
    train = Config().train
    return run_length(num_records, train.batch_size, train.epochs, train.example_budget, train.max_steps)


@pytest.mark.parametrize("records, steps_per_epoch, total_steps", [
    (1_000, 3, 90),  # 30 epochs, as tuned on small datasets
    (4_880, 19, 570),  # bibtex's train split: unchanged
    (100_000, 390, 11_700),  # 30 epochs still fit in 10^7 examples
    (1_000_000, 3_906, 39_062),  # 10 epochs: the budget, 10^7 examples
    (10_000_000, 39_062, 39_062),  # one epoch: never less
    (100_000_000, 390_625, 390_625),
])
def test_default_plan_from_1e3_to_1e7_records(records, steps_per_epoch, total_steps):
    assert default_plan(records) == (steps_per_epoch, total_steps)


def test_budget_off_max_steps_and_small_budgets():
    assert run_length(1_000_000, 256, 30, None, None) == (3906, 30 * 3906)  # null budget: always the epochs
    assert run_length(1_000_000, 256, 30, 10_000_000, 5_000) == (3906, 5_000)  # max_steps cuts further
    assert run_length(1_000_000, 256, 30, 100, None) == (3906, 3906)  # a budget under one batch: one epoch
    assert run_length(1_000_000, 1024, 30, 10_000_000, None) == (976, 9765)  # same examples at a larger batch
    assert run_length(100, 256, 30, 10_000_000, None) == (1, 30)  # fewer records than a batch


def test_short_run_follows_the_budget_and_its_schedule_spans_it(tiny_data, tmp_path):
    # tiny_data: 2400 train records; tiny.yaml: batch 64 (37 steps/epoch), 3 epochs = 111 steps. A budget of
    # 4000 examples cuts that to 62 steps (1.68 epochs), and the cosine decay must end at step 62, not 111.
    cfg = load_config(str(REPO_ROOT / "configs" / "tiny.yaml"),
                      ["train.example_budget=4000", "train.distribution=one_device", "train.deterministic=true",
                       "data.eval_split=''", "checkpoint.every_steps=0"])
    result, messages = train_in_process(cfg, tiny_data, tmp_path / "model")
    assert result.step == 62
    assert any("train.example_budget 4000: 62 steps (1.68 epochs of 2400 examples) instead of 3 epochs" in m
               for m in messages), messages
    logged = {int(m.group(1)): float(m.group(2)) for m in
              (re.match(r"step (\d+)/62 .* lr (\S+) ", line) for line in messages) if m}
    assert sorted(logged) == [20, 40, 60, 62]
    schedule = WarmupDecay(cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps, 62, "cosine", 0.0)
    for step, lr in logged.items():
        assert lr == pytest.approx(float(schedule(step)), rel=5e-3, abs=1e-9), step  # logged with 3 digits
    assert logged[62] < 1e-9  # decayed to the end at the last step trained
