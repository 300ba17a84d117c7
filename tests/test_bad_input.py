"""Bad input gives one clear line naming the file (and record), exit status 2, and leaves nothing behind.

Each case breaks a real dataset directory or input file and runs the command line (in process, and once as
``python -m data_pipeline``), or iterates the reader and asks ``explain_data_error`` what went wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import cli
from data_pipeline import manifest as mf
from data_pipeline.errors import DataError
from data_pipeline.generate import generate
from data_pipeline.reader import ReaderOptions, explain_data_error, make_dataset
from data_pipeline.writer import DatasetWriter, default_label_names, encode_example

REPO = Path(__file__).resolve().parents[1]
F, L = 8, 5


def fails(capsys, *argv) -> str:
    """Runs the CLI, expects exit status 2 and exactly one stderr line; returns that line."""
    assert cli.main([str(a) for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def dataset(tmp_path):
    """A valid generated dataset: 120 train examples in 2 shards, one example per record (packed data: see
    tests/test_packed.py)."""
    out = tmp_path / "ds"
    generate(str(out), 120, F, L, 2, seed=0, layout="example")
    return out


def shard(d, i=0, n=2, split="train"):
    return Path(d) / mf.shard_name(split, i, n)


def write_records(d, records, shards=1):
    """Writes hand-made records (features, label list) into shards with a matching manifest.

    Nothing is checked on the way, so records can hold what DatasetWriter would refuse.
    """
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(records), shards + 1).round().astype(int)
    names, counts = [], np.zeros(L, np.int64)
    for s in range(shards):
        names.append(mf.shard_name("train", s, shards))
        with tf.io.TFRecordWriter(str(d / names[-1])) as w:
            for features, labels in records[bounds[s]:bounds[s + 1]]:
                w.write(encode_example(np.asarray(features, np.float32), labels, mf.DENSE))
                counts[[j for j in labels if 0 <= j < L]] += 1
    mf.write_manifest(str(d), mf.Manifest(F, L, default_label_names(L), mf.DENSE, {"train": mf.SplitInfo(
        names, np.diff(bounds).tolist(), counts.tolist())}))
    return d


def good_records(n=60):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=F), [i % L]) for i in range(n)]


def record_offsets(path):
    """Byte offset of each record's data in a TFRecord file (8-byte length, 4-byte CRC, data, 4-byte CRC)."""
    data, offsets, pos = Path(path).read_bytes(), [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 8], "little")
        offsets.append(pos + 12)
        pos += 12 + length + 4
    return offsets


# --- dataset directories, through `inspect` ---------------------------------------------------------

def test_missing_directory(tmp_path, capsys):
    assert f"{tmp_path / 'nope'}: no such dataset directory" in fails(capsys, "inspect", tmp_path / "nope")


def test_missing_manifest(tmp_path, capsys):
    line = fails(capsys, "inspect", tmp_path)
    assert str(tmp_path / "manifest.json") in line and "manifest missing" in line


def test_missing_shard(dataset, capsys):
    os.remove(shard(dataset, 1))
    line = fails(capsys, "inspect", dataset)
    assert str(shard(dataset, 1)) in line and "missing" in line
    with pytest.raises(DataError, match="train-00001-of-00002.tfrecord"):
        make_dataset(str(dataset), "train", 8)


def test_manifest_and_shard_disagree_on_the_record_count(dataset, capsys):
    path = dataset / "manifest.json"
    raw = json.loads(path.read_text())
    raw["splits"]["train"]["shard_lengths"][0] += 1
    path.write_text(json.dumps(raw))
    line = fails(capsys, "inspect", dataset)
    assert str(shard(dataset, 0)) in line and "60 records but the manifest says 61" in line


def test_truncated_tfrecord(dataset, capsys):
    data = shard(dataset, 1).read_bytes()
    last = len(record_offsets(shard(dataset, 1))) - 1
    shard(dataset, 1).write_bytes(data[:-50])
    line = fails(capsys, "inspect", dataset)
    assert f"{shard(dataset, 1)} record {last}: truncated or corrupted TFRecord" in line


def test_corrupted_tfrecord_crc(dataset, capsys):
    offsets = record_offsets(shard(dataset, 0))
    data = bytearray(shard(dataset, 0).read_bytes())
    data[offsets[17] + 40] ^= 0xFF  # inside the features of record 17: only its CRC can tell
    shard(dataset, 0).write_bytes(bytes(data))
    line = fails(capsys, "inspect", dataset)
    assert f"{shard(dataset, 0)} record 17: truncated or corrupted TFRecord" in line


def test_label_index_out_of_range(tmp_path, capsys):
    records = good_records()
    records[33] = (records[33][0], [1, L])
    d = write_records(tmp_path / "d", records, shards=2)
    line = fails(capsys, "inspect", d)
    assert f"{shard(d, 1)} record 3: label index {L} out of range [0, {L})" in line


def test_feature_length_differs_from_the_manifest(tmp_path, capsys):
    records = good_records()
    records[7] = (np.zeros(F - 1), [0])
    d = write_records(tmp_path / "d", records, shards=2)
    assert f"{shard(d, 0)} record 7: {F - 1} features, expected {F}" in fails(capsys, "inspect", d)


def test_non_finite_features(tmp_path, capsys):
    records = good_records()
    for i, v in ((12, np.nan), (40, np.inf)):
        records[i][0][3] = v
    d = write_records(tmp_path / "d", records, shards=2)
    assert f"{shard(d, 0)} record 12: NaN/Inf feature value" in fails(capsys, "inspect", d)
    assert cli.main(["inspect", str(d), "--allow-non-finite"]) == 0
    assert "NaN/Inf records 2" in capsys.readouterr().out

    with DatasetWriter(str(tmp_path / "w"), F, L, on_bad_features="skip") as w:
        w.write_split("train", ((x, y, f"row {i}") for i, (x, y) in enumerate(records)), len(records), 2)
    assert w.num_skipped == 2
    assert w.manifest.splits["train"].num_examples == len(records) - 2


def test_empty_dataset_and_empty_split(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    mf.write_manifest(str(tmp_path / "e"), mf.Manifest(F, L, default_label_names(L), mf.DENSE, {}))
    assert f"{tmp_path / 'e' / 'manifest.json'}: the dataset has no splits" in fails(capsys, "inspect", tmp_path / "e")

    d = write_records(tmp_path / "d", [])
    assert f"{d}: split 'train' has no examples" in fails(capsys, "inspect", d)
    with pytest.raises(DataError, match="has no examples"):
        make_dataset(str(d), "train", 4)
    with pytest.raises(DataError, match="split 'train' is empty"), DatasetWriter(str(tmp_path / "w"), F, L) as w:
        w.write_split("train", iter(()), 0, 2)
    assert not (tmp_path / "w").exists()


# --- converter input ---------------------------------------------------------------------------------

def test_bad_libsvm_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "d.svm"
    path.write_text("0 1:1\n1 2:0.5\n2 3:abc\n")
    assert f"{path} line 3: bad feature '3:abc'" in fails(capsys, "convert", "--format", "libsvm", "--input", path,
                                                          "--out", tmp_path / "o")
    path.write_text("0 1:1\nx,1 2:0.5\n")
    assert f"{path} line 2: bad label list" in fails(capsys, "convert", "--format", "libsvm", "--input", path,
                                                     "--out", tmp_path / "o")
    path.write_text("3 4 2\n0 1:1\n")
    assert f"{path}: header says 3 records but the file has 1" in fails(
        capsys, "convert", "--format", "libsvm", "--input", path, "--out", tmp_path / "o")
    path.write_text("")
    assert f"{path}: no records" in fails(capsys, "convert", "--format", "libsvm", "--input", path,
                                          "--num-features", 3, "--num-labels", 2, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_csv_errors_name_file_column_and_line(tmp_path, capsys):
    path = tmp_path / "data.csv"
    path.write_text("a,b,tag_x\n1,2,0\n3,oops,1\n")
    base = ["convert", "--format", "csv", "--input", path, "--out", tmp_path / "o"]
    assert f"{path}: label column 'tag_z' not in the header" in fails(capsys, *base, "--label-columns", "tag_x,tag_z")
    assert f"{path}: no column starts with 'y_'" in fails(capsys, *base, "--label-columns", "y_*")
    assert f"{path} line 3: column 'b' is not a number ('oops')" in fails(capsys, *base, "--label-columns", "tag_*")
    path.write_text("a,b,tag_x\n1,2,0\n3,4,2\n")
    assert f"{path} line 3: label column 'tag_x' is '2', expected 0 or 1" in fails(capsys, *base, "--label-columns",
                                                                                  "tag_x")
    path.write_text("a,b,tag_x\n1,,0\n3,4,1\n")
    assert f"{path} line 2: NaN/Inf feature value" in fails(capsys, *base, "--label-columns", "tag_x")
    assert cli.main([*map(str, base), "--label-columns", "tag_x", "--on-bad-features", "skip"]) == 0
    assert mf.read_manifest(str(tmp_path / "o")).splits["train"].num_examples == 1


def test_arff_errors_name_the_file(tmp_path, capsys):
    xml = tmp_path / "d.xml"
    xml.write_text('<?xml version="1.0"?>\n<labels xmlns="http://mulan.sourceforge.net/labels">'
                   '<label name="y1"></label><label name="y2"></label></labels>\n')
    arff = tmp_path / "d-train.arff"
    header = "@relation r\n@attribute f1 numeric\n@attribute {} {}\n@attribute y1 {{0,1}}\n"
    arff.write_text(header.format("f2", "numeric") + "@data\n1,2,0\n")
    base = ["convert", "--format", "arff", "--input", arff, "--out", tmp_path / "o"]
    assert f"{arff}: label 'y2' of {xml} is not an attribute of the ARFF file" in fails(capsys, *base)
    arff.write_text(header.format("y2", "{0,1}").replace("f1 numeric", "f1 string") + "@data\nabc,1,0\n")
    assert f"{arff}: feature 'f1' is non-numeric (STRING)" in fails(capsys, *base)
    arff.write_text(header.format("y2", "{0,1}") + "@data\n1,0,1\n2,1,1\nx,0,0\n")
    assert f"{arff} record 2: Invalid numerical value, at line 8" in fails(capsys, *base)
    assert not (tmp_path / "o").exists()


def test_failure_mid_way_leaves_no_output_and_no_temporary_directory(tmp_path, capsys):
    path = tmp_path / "big.svm"
    lines = [f"{i % 3} {i % 7}:1.5" for i in range(200)]
    lines[150] = "1 5:1 bad"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    # With the shape given, the first pass only counts lines, so the error comes while shards are written.
    line = fails(capsys, "convert", "--format", "libsvm", "--input", path, "--out", out, "--shards", 4,
                 "--num-features", 7, "--num-labels", 3)
    assert f"{path} line 151: bad feature 'bad'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.svm"]  # no out, no out.tmp-*


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    (tmp_path / "d.svm").write_text("0 1:1\n1 2:1\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["convert", "--format", "libsvm", "--input", tmp_path / "d.svm", "--out", out]
    assert f"{out}: already exists (pass --overwrite to replace it)" in fails(capsys, *args)
    assert f"{out}: already exists" in fails(capsys, "generate", "--out", out, "--examples", 10, "--features", 2,
                                             "--labels", 2)
    assert (out / "keep.txt").read_text() == "precious"
    assert cli.main([*map(str, args), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and mf.read_manifest(str(out)).splits["train"].num_examples == 2


def test_python_dash_m_prints_one_line_and_exits_2(tmp_path):
    missing = tmp_path / "no-such-dataset"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "inspect", str(missing)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {missing}: no such dataset directory"


# --- the reader: explain_data_error ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["label", "length", "nan"])
def test_reader_error_is_explained_with_file_and_record(tmp_path, kind):
    records = good_records(90)
    x, y = records[35]  # shard 1 (records 30..59), record 5
    records[35] = {"label": (x, [L + 2]), "length": (x[:-2], y), "nan": (np.where(x > 0, np.nan, x), y)}[kind]
    d = write_records(tmp_path / "d", records, shards=3)
    ds = make_dataset(str(d), "train", 16, options=ReaderOptions(shuffle=True, repeat=False))
    with pytest.raises(tf.errors.OpError) as info:
        for _ in ds:
            pass
    message = str(explain_data_error(str(d), "train", info.value))
    assert message.startswith(f"{shard(d, 1, 3)} record 5: "), message
    assert {"label": f"label index {L + 2} out of range", "length": f"{F - 2} features, expected {F}",
            "nan": "NaN/Inf feature value"}[kind] in message


def test_explain_data_error_falls_back_to_the_tensorflow_message(dataset):
    exc = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor\nmore detail")
    assert str(explain_data_error(str(dataset), "train", exc)) == f"{dataset} split 'train': OOM when allocating tensor"
