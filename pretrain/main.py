"""The ``pretrain`` command.

    pretrain shards xray SRC OUT                    X-ray files (DICOM/PNG/JPEG) -> WebDataset shards + manifest
    pretrain shards tiles SRC OUT                   pathology tiles (JPEG/PNG, a folder per slide) -> shards
    pretrain train --config X.yaml [a.b=c ...]      one process
    pretrain train --nproc 2 --config X.yaml        N local processes (torchrun, gloo on CPU)
    pretrain train --cluster clusters/local.yaml    processes and environment from a local profile
    pretrain export CHECKPOINT [OUT] [--verify]     checkpoint -> timm + transformers bundle (parity-checked)
                    [--weights teacher|student]     which encoder (DINOv2 writes its teacher by default)
    pretrain lineage check BUNDLE KEYS.txt          exit 1 if pretraining consumed any of these sample keys

Under torchrun or srun, ``pretrain train`` reads its rank from the environment.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train(args) -> int:
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors stop here, before any process starts
    if (args.cluster or args.nproc) and "WORLD_SIZE" not in os.environ:
        from launch.local import LocalProfile, load_profile, spawn

        profile = load_profile(args.cluster) if args.cluster else LocalProfile()
        nproc = args.nproc or profile.processes_per_node
        argv = ["train"] + (["--config", args.config] if args.config else []) + list(args.overrides)
        return spawn(nproc, argv, profile.env)
    from pretrain.trainer import Trainer

    metrics = Trainer(cfg).train()
    if metrics and os.environ.get("RANK", "0") == "0":
        print(f"finished {cfg.train.steps} steps: loss {metrics['loss']:.4f}; run folder {cfg.run_dir}")
    return 0


def _export(args) -> int:
    from pretrain.export import export

    result = export(args.checkpoint, args.out, check=args.verify, weights=args.weights)
    print(f"export bundle written to {result['bundle']}")
    if result["parity"] is not None:
        print("parity with the training encoder (max abs difference): "
              + ", ".join(f"{name} {value:.2e}" for name, value in result["parity"].items()))
    if result["mlflow_run_id"]:
        print(f"logged to MLflow run {result['mlflow_run_id']} under exports/")
    return 0


def _shards(args) -> int:
    from data_pipeline.write_shards import WRITERS

    manifest = WRITERS[args.modality](args.src, args.out, samples_per_shard=args.samples_per_shard,
                                      progress=not args.no_progress, labels=args.labels)
    print(f"{manifest['total_samples']} samples in {len(manifest['shards'])} shard(s) at {args.out}; "
          f"{len(manifest['skipped'])} file(s) skipped (listed in manifest.json)")
    return 0


def _lineage(args) -> int:
    from data_pipeline.lineage import seen_keys

    overlap, checked = seen_keys(args.bundle, args.keys)
    if overlap:
        print(f"{len(overlap)} of {checked} keys were consumed in pretraining: " + ", ".join(overlap[:20])
              + (" ..." if len(overlap) > 20 else ""))
        return 1
    print(f"none of the {checked} keys was consumed in pretraining")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pretrain`` command."""
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="pretrain a ViT")
    train.add_argument("--config", help="run config YAML (defaults: the tiny CPU MAE run)")
    train.add_argument("--nproc", type=int, help="local processes to start with torchrun")
    train.add_argument("--cluster", help="local profile (clusters/local.yaml): process count and environment")
    train.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. train.steps=10)")
    train.set_defaults(func=_train)
    export = commands.add_parser("export", help="write a timm-loadable bundle from a checkpoint")
    export.add_argument("checkpoint", help="checkpoint folder, run folder or checkpoints/latest")
    export.add_argument("out", nargs="?", help="bundle folder to write (default: <run>/exports/<checkpoint>)")
    export.add_argument("--verify", action="store_true",
                        help="load the bundle with timm and transformers and compare features (fails over tolerance)")
    export.add_argument("--weights", help="which encoder to write: teacher (DINOv2 default) or student")
    export.set_defaults(func=_export)
    lineage = commands.add_parser("lineage", help="data lineage of an export bundle")
    lineage_commands = lineage.add_subparsers(dest="action", required=True)
    check = lineage_commands.add_parser("check", help="exit 1 if any key in KEYS was consumed in pretraining")
    check.add_argument("bundle", help="export bundle folder (holds lineage.json)")
    check.add_argument("keys", help="text file, one sample key per line")
    check.set_defaults(func=_lineage)
    shards = commands.add_parser("shards", help="convert raw data into WebDataset shards")
    kinds = shards.add_subparsers(dest="modality", required=True)
    sources = {
        "xray": ("DICOM / PNG / JPEG X-rays", "folder of X-ray files (searched recursively)"),
        "tiles": ("pathology tiles already cut from slides (JPEG / PNG, a folder per slide)",
                  "folder of tiles (searched recursively; sub-folder = slide id)"),
    }
    for modality, (summary, src_help) in sources.items():
        kind = kinds.add_parser(modality, help=summary)
        kind.add_argument("src", help=src_help)
        kind.add_argument("out", help="folder for the shards and manifest.json")
        kind.add_argument("--samples-per-shard", type=int, default=256)
        kind.add_argument("--no-progress", action="store_true", help="no progress bar")
        kind.add_argument("--labels", help="CSV of path,label rows: writes a labelled set (e.g. for probes)")
        kind.set_defaults(func=_shards)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pretrain`` console script."""
    _setup_logging()
    args = build_parser().parse_args(argv)
    from data_pipeline.errors import BadInputError
    from pretrain.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, BadInputError, FileNotFoundError, AssertionError, ValueError) as exc:
        print(f"pretrain {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
