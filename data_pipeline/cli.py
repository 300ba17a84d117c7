"""Command line of data_pipeline: ``generate``, ``convert`` and ``inspect``.

Each subcommand prints one line naming the file (and record) at fault on bad input and exits 2; it never
leaves a half-written dataset behind (writers rename a temporary directory on success).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from data_pipeline.errors import DataError, as_disk_full


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a learnable synthetic dataset")
    g.add_argument("--out", required=True)
    g.add_argument("--examples", type=int, required=True)
    g.add_argument("--features", type=int, required=True)
    g.add_argument("--labels", type=int, required=True)
    g.add_argument("--shards", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--split-eval", type=float, default=0.0, help="fraction written to an 'eval' split")
    g.add_argument("--workers", type=int, default=None, help="writer processes (default: CPU count)")
    g.add_argument("--sparse", action="store_true",
                   help="bag-of-words documents (Zipf word and label frequencies) in the sparse encoding")
    g.add_argument("--nonzeros", type=int, default=100, help="--sparse: words per document (about its non-zeros)")
    _storage_flags(g)
    g.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("convert", help="convert ARFF / LIBSVM / CSV / NPZ files or a TFDS dataset into a dataset")
    c.add_argument("--format", required=True, choices=["arff", "libsvm", "csv", "npz", "tfds"])
    c.add_argument("--input", required=True, nargs="+",
                   help="input files; split names come from the file names (train/test/eval/valid) "
                        "or from --splits")
    c.add_argument("--splits", nargs="+", default=None, help="split name of each --input file")
    c.add_argument("--out", required=True)
    c.add_argument("--shards", type=int, default=8)
    c.add_argument("--labels-xml", default=None, help="Mulan XML naming the label attributes (arff)")
    c.add_argument("--label-columns", default=None,
                   help="csv: comma-separated label column names, or a prefix ending in '*' (e.g. 'tag_*')")
    c.add_argument("--num-labels", type=int, default=None, help="libsvm/npz: number of labels")
    c.add_argument("--num-features", type=int, default=None, help="libsvm: number of features")
    c.add_argument("--index-base", type=int, choices=[0, 1], default=0,
                   help="libsvm: index of the first feature (0: XMC repository files, 1: classic LIBSVM)")
    c.add_argument("--label-names", default=None, help="file with one label name per line")
    c.add_argument("--encoding", choices=["dense", "sparse"], default=None,
                   help="feature storage (default: sparse for sparse inputs, dense otherwise)")
    c.add_argument("--feature-keys", nargs="+", default=(),
                   help="tfds: feature key(s): numeric tensors, text or token ids (concatenated in this order)")
    c.add_argument("--label-keys", nargs="+", default=(),
                   help="tfds: one multi-hot or Sequence(ClassLabel) key, or several boolean keys (one per label)")
    c.add_argument("--hash-features", type=int, default=None, metavar="N",
                   help="hash feature ids (or tokens) into N buckets, summing collisions; recorded in the manifest "
                        "so that predict hashes its input the same way")
    _storage_flags(c)
    c.add_argument("--on-bad-features", choices=["fail", "skip"], default="fail")
    c.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("inspect", help="read every record, check it, print label statistics")
    i.add_argument("dir")
    i.add_argument("--allow-non-finite", action="store_true", help="count NaN/Inf records, do not fail")
    i.add_argument("--top", type=int, default=5, help="most/least frequent labels to list")
    return p


def check_generate_flags(args: argparse.Namespace) -> None:
    """Rejects generate flags that cannot describe a dataset, naming the flag (argparse only checks types)."""
    for flag, value, low in (("--examples", args.examples, 1), ("--features", args.features, 1),
                             ("--labels", args.labels, 1), ("--shards", args.shards, 1), ("--seed", args.seed, 0),
                             ("--workers", args.workers, 1), ("--block-size", args.block_size, 1),
                             ("--nonzeros", args.nonzeros, 1)):
        if value is not None and value < low:
            raise DataError(f"{flag}: must be >= {low} (got {value})")
    if not 0.0 <= args.split_eval < 1.0:
        raise DataError(f"--split-eval: must be in [0, 1) (got {args.split_eval})")
    if args.examples - int(round(args.examples * args.split_eval)) < 1:
        raise DataError(f"--split-eval {args.split_eval}: leaves no training example of --examples {args.examples}")


def _storage_flags(p: argparse.ArgumentParser) -> None:
    from data_pipeline import manifest as mf

    p.add_argument("--layout", choices=["packed", "example"], default="packed",
                   help="packed: one record holds a block of examples (fast to read; default); example: one "
                        "example per record (the layout of earlier versions)")
    p.add_argument("--feature-dtype", choices=list(mf.FEATURE_DTYPES), default="float32",
                   help="packed layout: stored feature dtype (float16 / bfloat16: half the bytes)")
    p.add_argument("--block-size", type=int, default=mf.DEFAULT_BLOCK_SIZE,
                   help="packed layout: examples per record")


def convert_options(args: argparse.Namespace):
    """The ConvertOptions of parsed ``convert`` arguments."""
    from data_pipeline.converters import ConvertOptions

    return ConvertOptions(
        format=args.format, inputs=tuple(args.input), out=args.out,
        splits=tuple(args.splits) if args.splits is not None else None, shards=args.shards, layout=args.layout,
        encoding=args.encoding, feature_dtype=args.feature_dtype, block_size=args.block_size,
        on_bad_features=args.on_bad_features, overwrite=args.overwrite, label_names=args.label_names,
        labels_xml=args.labels_xml, label_columns=args.label_columns, num_labels=args.num_labels,
        num_features=args.num_features, index_base=args.index_base, hash_features=args.hash_features,
        feature_keys=tuple(args.feature_keys), label_keys=tuple(args.label_keys))


def run_inspect(directory: str, allow_non_finite: bool, top: int) -> None:
    """Prints the summary of every split of a dataset directory."""
    import numpy as np

    from data_pipeline import manifest as mf
    from data_pipeline import validate

    m = mf.read_manifest(directory)
    storage = f", {m.feature_dtype}, blocks of {m.block_size}" if m.packed else ""
    print(f"{directory}: {m.num_features} features ({m.feature_encoding}{storage}), {m.num_labels} labels")
    for split in sorted(m.splits):
        s = validate.inspect_split(directory, split, m, allow_non_finite=allow_non_finite)
        order = np.argsort(-s.label_counts, kind="stable")
        fmt = lambda ids: ", ".join(f"{m.label_names[j]}={s.label_counts[j]}" for j in ids)  # noqa: E731
        print(f"  {split}: {s.num_examples} examples in {len(m.splits[split].shards)} shards; "
              f"cardinality {s.label_cardinality:.3f}, density {s.label_density:.5f}, "
              f"labels never positive {int((s.label_counts == 0).sum())}, NaN/Inf records {s.non_finite_records}")
        print(f"    most frequent:  {fmt(order[:top])}")
        print(f"    least frequent: {fmt(order[::-1][:top])}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # TensorFlow Datasets' progress lines
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.command == "generate":
            from data_pipeline.generate import generate

            check_generate_flags(args)
            m = generate(args.out, args.examples, args.features, args.labels, args.shards, args.seed,
                         args.split_eval, overwrite=args.overwrite, workers=args.workers, layout=args.layout,
                         feature_dtype=args.feature_dtype, block_size=args.block_size,
                         sparse_nonzeros=args.nonzeros if args.sparse else None)
            print(f"wrote {args.out}: " + ", ".join(f"{k} {v.num_examples} examples in {len(v.shards)} shards"
                                                    for k, v in m.splits.items()))
        elif args.command == "convert":
            from data_pipeline.converters import convert

            m = convert(convert_options(args))
            print(f"wrote {args.out}: {m.num_features} features, {m.num_labels} labels; " + ", ".join(
                f"{k} {v.num_examples} examples in {len(v.shards)} shards" for k, v in m.splits.items()))
        else:
            run_inspect(args.dir, args.allow_non_finite, args.top)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a full disk is one line too; anything else keeps its traceback
        full = as_disk_full(e)
        if full is None:
            raise
        print(f"error: {full} (nothing was written: the output appears only when complete)", file=sys.stderr)
        return 1
    return 0
