"""What a person at a terminal sees: the progress line (epoch, elapsed time, ETA) never shares a line with a
log record, and ``python -m trainer ... --help`` is plain text with help and a default for every option."""

from __future__ import annotations

import argparse
import os
import pty
import re
import subprocess
import threading

import pytest

from conftest import REPO_ROOT, repo_env, trainer_cmd
from trainer import cli

LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR) ")


def run_on_a_terminal(args, timeout: float = 300) -> tuple[int, str]:
    """Runs ``python -m trainer ARGS`` with stdout and stderr on a pseudo-terminal; returns (exit status, the
    raw bytes written to the terminal, decoded)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(trainer_cmd(*args), cwd=REPO_ROOT, env=repo_env(), stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(30)
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def visible_lines(raw: str) -> list[str]:
    """The lines a terminal shows: on each line only what was written after the last carriage return, with
    the erase-to-end-of-line sequences removed."""
    return [line.split("\r")[-1].replace("\x1b[K", "") for line in raw.replace("\r\n", "\n").split("\n")]


def test_progress_line_has_epoch_eta_and_is_erased_before_log_lines(tiny_data, tmp_path):
    code, raw = run_on_a_terminal(["train", "--config", "configs/tiny.yaml", "--data", tiny_data, "--model-dir",
                                   tmp_path / "m", "--distribution", "one_device", "--epochs", "2",
                                   "--set", "train.log_every_steps=25"])
    assert code == 0, raw[-3000:]
    bars = re.findall(r"\[[#.]{30}\] (\d+)/(\d+) epoch (\d+)/(\d+) loss [0-9.]+ [0-9,]+ ex/s "
                      r"(\d+:\d\d) elapsed, ETA (\d+:\d\d|\?)", raw)
    assert bars, raw[-3000:]
    assert {(total, epochs) for _, total, _, epochs in [b[:4] for b in bars]} == {("74", "2")}
    assert {epoch for _, _, epoch, _ in [b[:4] for b in bars]} == {"1", "2"}
    lines = visible_lines(raw)
    records = [line for line in lines if LOG_RECORD.search(line)]
    assert any(" eval step 37: " in line for line in records)  # evaluation at the end of epoch 1
    for line in records:
        assert LOG_RECORD.match(line), f"a log record shares its line with other output: {line!r}"
    # The run's last words are on lines of their own too.
    assert any(line.startswith("trained 74 steps; exported model:") for line in lines), lines[-5:]


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **sub.choices}


@pytest.mark.parametrize("command", ["", "train", "evaluate", "predict"])
def test_help_is_plain_text_with_every_option_explained(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m trainer" in text
    assert not re.search(r"``|:func:|:class:|:mod:|`\w", text), text  # no reST markup
    for action in subcommand_parsers()[command]._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = action.option_strings[-1]
        assert action.help, f"{command} {name}: no help text"
        if not action.required and not (command == "predict" and name in ("--data", "--input")):
            # (--data / --input of predict: one of the two is required)
            assert "default: " in action.help, f"{command} {name}: the help does not say the default"
        if action.default not in (None, [], argparse.SUPPRESS):
            assert f"default: {action.default}" in action.help, f"{command} {name}: default {action.default!r}"
