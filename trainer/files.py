"""Reading the small JSON files of a model directory with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Any

from data_pipeline.errors import DataError

RUN_INFO = "run_info.json"
RUN_INFO_KEYS = ("num_features", "num_labels", "label_names")


def read_json(path: str) -> Any:
    """Parses a JSON file.

    Raises:
      FileNotFoundError: no such file.
      DataError: the file is not valid JSON (names the file, line and column).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text)") from None


def read_run_info(model_dir: str) -> dict | None:
    """The model directory's run_info.json (shape and label names of the run), or None if it has none.

    Raises:
      DataError: the file is damaged (not JSON, or without a key every run writes); names the file.
    """
    path = os.path.join(model_dir, RUN_INFO)
    if not os.path.exists(path):
        return None
    info = read_json(path)
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(info).__name__}")
    missing = [k for k in RUN_INFO_KEYS if k not in info]
    if missing:
        raise DataError(f"{path}: no '{missing[0]}' key (the file is damaged)")
    return info
