"""The ``pretrain`` command.

    pretrain shards xray SRC OUT                    X-ray files (DICOM/PNG/JPEG) -> WebDataset shards + manifest
    pretrain shards tiles SRC OUT                   pathology tiles (JPEG/PNG, a folder per slide) -> shards
    pretrain shards ct SRC OUT                      NIfTI files / DICOM series -> int16 HU volumes + spacing
    pretrain shards wsi SRC OUT [--mpp 0.5]         whole-slide images -> JPEG tissue tiles
    pretrain shards video SRC OUT [--max-side N]    video clips -> mp4 + fps / frame count
      [--workers N] [--fresh]                       ... on N processes (default: every core); run again over
                                                    OUT to add new sources, or to finish a killed conversion
      [--submit clusters/X.yaml --tasks K]          ... as a SLURM array of K tasks, then a merge job
    pretrain shards resume OUT [--task I --tasks K] finish a conversion's unconverted parts (all, or one task's)
    pretrain shards merge OUT                       converted parts -> <modality>-NNNNNN.tar + manifest.json
    pretrain shards inspect URL [--sheet X.png]     counts, shapes, spacing / mpp / fps, contact sheet
    pretrain train --config X.yaml [a.b=c ...]      one process
    pretrain train --nproc 2 --config X.yaml        N local processes (torchrun, gloo on CPU)
    pretrain train --cluster clusters/local.yaml    processes and environment from a local profile
    pretrain export CHECKPOINT [OUT] [--verify]     checkpoint -> timm + transformers bundle (parity-checked)
                    [--weights teacher|student]     which encoder (DINOv2 writes its teacher by default)
                    [--register MODEL]              and register it as an MLflow model version
                    [--stem MODALITY]               which stem of a mixture model (default: data.modality)
                    [--student NAME]                which student of several (default: each, OUT/<name>)
    pretrain import SOURCE OUT [--num-heads N]     official MAE / DINOv2 / DINOv3 .pth, timm or transformers weights ->
                                                    an import folder for checkpoint.init_from (parity-checked)
    pretrain checkpoint convert CHECKPOINT [--workers K]
                                                    ZeRO checkpoint -> its universal conversion, which resumes
                                                    on any process count (resume=auto converts by itself)
    pretrain lineage check BUNDLE KEYS.txt          exit 1 if pretraining consumed any of these sample keys
                    [--by patient|study|series|slide|source]   ... or patients (raw ids or hashes), slides...
    pretrain submit --cluster clusters/X.yaml --config X.yaml [--dry-run] [--array k=v1,v2] [a.b=c ...]
                                                    render an sbatch script from a SLURM profile and submit it
    pretrain plan --config X.yaml --cluster clusters/Y.yaml   per-GPU memory, FLOPs, largest micro-batch (exit 1:
                                                    does not fit), loader cores per GPU [--mfu 0.4]
                                                    [--loader-rates PATH] [--measure-loader]
    pretrain status RUN_DIR                         SLURM job state, last step and checkpoint, MLflow run
    pretrain mlflow-server --backend URI --artifacts DIR --host H --port P [--auth]
                                                    a team tracking server (sqlite or PostgreSQL); off
                                                    loopback it asks for passwords (MLflow basic-auth)

Under torchrun or srun, ``pretrain train`` reads its rank from the environment. A run stopped by
``train.stop_signal`` (SLURM's warning before preemption or the time limit) checkpoints, writes
``<run>/STOPPED`` and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from pretrain import shards_cli


def _setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train(args) -> int:
    from pretrain.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)  # config errors stop here, before any process starts
    if (args.cluster or args.nproc) and "WORLD_SIZE" not in os.environ:
        from launch.local import spawn
        from launch.profiles import ClusterProfile, load_profile

        profile = load_profile(args.cluster) if args.cluster else ClusterProfile()
        if profile.scheduler != "local":
            raise ConfigError(f"{args.cluster}: a {profile.scheduler} profile; submit with `pretrain submit --cluster`")
        nproc = args.nproc or profile.processes_per_node
        argv = ["train"] + (["--config", args.config] if args.config else []) + list(args.overrides)
        return spawn(nproc, argv, profile.env)
    from pretrain import dist
    from pretrain.trainer import Preempted, Trainer

    try:
        metrics = Trainer(cfg).train()
        dist.barrier()  # every rank done before any leaves the group (a rank leaving early aborted at exit in CI)
    except Preempted as stopped:  # exit 0 on every rank: launchers kill the other ranks on a non-zero exit
        print(f"stopped on train.stop_signal={cfg.train.stop_signal} after checkpoint {stopped} (marker "
              f"{cfg.run_dir}/STOPPED); the next start resumes from it", file=sys.stderr)
        return 0
    finally:
        dist.destroy()
    if metrics and os.environ.get("RANK", "0") == "0":
        print(f"finished {cfg.train.steps} steps: loss {metrics['loss']:.4f}; run folder {cfg.run_dir}")
    return 0


def _export(args) -> int:
    """One bundle, or one per student of a several-students distillation (each in OUT/<student> where OUT is
    given) unless --student names one."""
    from pretrain import checkpoint, students

    path = checkpoint.resolve(args.checkpoint, args.checksums)
    names = [args.student] if args.student else students.saved_students(path)
    for name in names or [None]:
        out = os.path.join(args.out, name) if args.out and name and not args.student else args.out
        _export_one(args, path, out, name)
    return 0


def _export_one(args, path: str, out, student) -> None:
    from pretrain.export import export

    result = export(path, out, check=args.verify, weights=args.weights, register=args.register,
                    stem=args.stem, checksums=args.checksums, student=student)
    print(f"export bundle written to {result['bundle']}" + (f" (student {student})" if student else ""))
    if result["parity"] is not None:
        print("parity with the training encoder (max abs difference): "
              + ", ".join(f"{name} {value:.2e}" for name, value in result["parity"].items()))
    if result["mlflow_run_id"]:
        print(f"logged to MLflow run {result['mlflow_run_id']} under exports/")
    if result["model_version"]:
        print(f"registered as MLflow model {args.register} version {result['model_version']}")


def _import(args) -> int:
    from pretrain.importers import import_weights

    record = import_weights(args.source, args.out, num_heads=args.num_heads, norm_eps=args.norm_eps,
                            verify=not args.no_verify,
                            atol=args.atol)
    print(f"import folder written to {args.out} ({record['format']}: model.safetensors, config.json, import.json)")
    for note in record["notes"]:
        print(f"  note: {note}")
    print("train from it with: checkpoint.init_from=" + args.out + " " + " ".join(record["overrides"]))
    if record["parity"]:
        parity = record["parity"]
        print(f"max feature difference vs the {parity['reference']}: {parity['max_abs_difference']:.2e} "
              f"(tolerance {parity['atol']:g})")
    else:
        print("features not compared with the source")
    return 0


def _submit(args) -> int:
    from launch.submit import submit

    result = submit(args.cluster, args.config, args.overrides, args.array or [], dry_run=args.dry_run)
    for warning in result["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    if args.dry_run:
        print(result["text"])
        print(f"# (dry run: written to {result['script']}, not submitted)", file=sys.stderr)
    else:
        print(f"submitted job {result['job_id']}: {result['script']}")
        for run in result["runs"]:
            print(f"  run folder {run}")
    return 0


def _plan(args) -> int:
    import json

    from launch.profiles import ClusterProfile, load_profile
    from pretrain.config import load_config
    from pretrain.plan import build_plan, format_plan, stage_plans, student_plans
    from pretrain.plan_loader import LoaderOptions, check_mfu

    loader = LoaderOptions(check_mfu(args.mfu), args.loader_rates, "always" if args.measure_loader else "auto")
    cfg = load_config(args.config, args.overrides)
    profile = load_profile(args.cluster) if args.cluster else ClusterProfile()
    several = cfg.objective.name == "distill" and bool(cfg.objective.distill.students)
    if several:
        plans, kind = student_plans(cfg, profile, loader), "students"
    elif cfg.train.stages:
        plans, kind = stage_plans(cfg, profile, loader), "stages"
    else:
        plans, kind = [build_plan(cfg, profile, loader=loader)], ""
    print("\n\n".join(_plan_head(plan) + format_plan(plan) for plan in plans))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({kind: plans} if kind else plans[0], handle, indent=2)
    return 0 if all(plan["fits"] for plan in plans) else 1


def _plan_head(plan: dict) -> str:
    """The line above a student's or a stage's plan ('' for a run's one plan)."""
    if "student" in plan:
        return f"student {plan['student']}:\n"
    return f"{plan['stage']}:\n" if "stage" in plan else ""


def _status(args) -> int:
    from launch.status import run_status

    print(run_status(args.run_dir))
    return 0


def _mlflow_server(args) -> int:
    from launch.mlflow_server import serve

    return serve(args.backend, args.artifacts, args.host, args.port, args.auth, args.auth_db)


def _convert(args) -> int:
    from pretrain import checkpoint

    folder = checkpoint.convert(checkpoint.resolve(args.checkpoint, args.checksums), args.workers)
    print(f"universal checkpoint at {folder}: resumes on any process count")
    return 0


def _lineage(args) -> int:
    from data_pipeline.lineage import PLURAL, seen_keys

    overlap, checked = seen_keys(args.bundle, args.keys, args.by)
    if overlap:
        print(f"{len(overlap)} of {checked} {PLURAL[args.by]} were consumed in pretraining: " + ", ".join(overlap[:20])
              + (" ..." if len(overlap) > 20 else ""))
        return 1
    print(f"none of the {checked} {PLURAL[args.by]} was consumed in pretraining")
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
    submit = commands.add_parser("submit", help="render an sbatch script from a cluster profile and submit it")
    submit.add_argument("--cluster", required=True, help="SLURM cluster profile (clusters/*.yaml)")
    submit.add_argument("--config", help="run config YAML")
    submit.add_argument("--dry-run", action="store_true", help="print the script (written to the run folder), "
                                                                "do not submit")
    submit.add_argument("--array", action="append", metavar="KEY=V1,V2",
                        help="sweep: one array task per combination of values (repeatable)")
    submit.add_argument("overrides", nargs="*", help="config overrides, key=value")
    submit.set_defaults(func=_submit)
    plan = commands.add_parser("plan", help="per-GPU memory, FLOPs and the largest micro-batch of a run on a cluster")
    plan.add_argument("--config", help="run config YAML")
    plan.add_argument("--cluster", help="cluster profile (GPUs, their memory); default: one 80 GB GPU")
    plan.add_argument("--json", help="also write the numbers to this JSON file")
    plan.add_argument("--mfu", type=float, default=0.4, help="MFU the loader must feed (0 < X <= 1; default 0.4)")
    plan.add_argument("--loader-rates", metavar="PATH", help="per-core loader rates JSON (benchmarks/loader.py; "
                      "default benchmarks/results/loader_rates.json)")
    plan.add_argument("--measure-loader", action="store_true", help="measure the loader's per-core rate on the "
                      "recipe's shards here (a few seconds; done anyway when no rate is known for the case)")
    plan.add_argument("overrides", nargs="*", help="config overrides, key=value")
    plan.set_defaults(func=_plan)
    status = commands.add_parser("status", help="job state, last step and checkpoint, MLflow run of a run folder")
    status.add_argument("run_dir", help="run folder (<output_dir>/<name>)")
    status.set_defaults(func=_status)
    server = commands.add_parser("mlflow-server", help="start a team MLflow tracking server")
    server.add_argument("--backend", default="sqlite:///mlflow/mlflow.db",
                        help="backend store URI: sqlite:///PATH or postgresql://USER:PASS@HOST/DB")
    server.add_argument("--artifacts", default="mlflow/artifacts", help="artifact root (a folder or s3://...)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for the whole network)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--auth", action="store_true", help="MLflow's basic-auth also on loopback (always on for "
                        "any other address); admin from PRETRAIN_MLFLOW_ADMIN_USERNAME / _PASSWORD")
    server.add_argument("--auth-db", help="auth database URI (default: sqlite basic_auth.db beside a sqlite "
                        "backend, else in ./mlflow)")
    server.set_defaults(func=_mlflow_server)
    export = commands.add_parser("export", help="write a timm-loadable bundle from a checkpoint")
    export.add_argument("checkpoint", help="checkpoint folder, run folder or checkpoints/latest")
    export.add_argument("out", nargs="?", help="bundle folder to write (default: <run>/exports/<checkpoint>)")
    export.add_argument("--verify", action="store_true",
                        help="load the bundle with timm and transformers and compare features (fails over tolerance)")
    export.add_argument("--checksums", action="store_true", help="also verify every checkpoint file's CRC-32 (sizes "
                        "always are); a damaged newest checkpoint of a run is passed over for the one before")
    export.add_argument("--weights", help="which encoder to write: teacher (DINOv2 default) or student")
    export.add_argument("--register", metavar="MODEL", help="also register the bundle as a new version of this "
                                                              "MLflow model (in the run's tracking store)")
    export.add_argument("--stem", metavar="MODALITY", help="which patch-embedding stem to write with the trunk "
                                                           "(a mixture's modality; default: data.modality)")
    export.add_argument("--student", metavar="NAME", help="which student of a several-students distillation to "
                        "write (default: each, OUT/<student> where OUT is given)")
    export.set_defaults(func=_export)
    imports = commands.add_parser("import", help="turn published ViT weights into an import folder for "
                                                 "checkpoint.init_from")
    imports.add_argument("source", help="transformers folder (ViT / Dinov2), timm folder or .safetensors, MAE "
                                        "checkpoint or DINOv2 backbone .pth")
    imports.add_argument("out", help="import folder to write")
    imports.add_argument("--num-heads", type=int, help="attention heads of a .pth source (its weights do not say; "
                                                       "default: the published count for its width, else 64-wide)")
    imports.add_argument("--norm-eps", type=float, help="LayerNorm eps of a DINOv3 .pth (its weights do not say; "
                         "default 1e-5, the hub models')")
    imports.add_argument("--atol", type=float, default=1e-5, help="largest feature difference from the source accepted "
                                                                 "(default 1e-5)")
    imports.add_argument("--no-verify", action="store_true", help="skip the feature comparison with the source")
    imports.set_defaults(func=_import)
    ckpt = commands.add_parser("checkpoint", help="operations on a run's checkpoints")
    convert = ckpt.add_subparsers(dest="action", required=True).add_parser(
        "convert", help="write a ZeRO checkpoint's universal conversion (for a resume on another process count)")
    convert.add_argument("checkpoint", help="checkpoint folder, run folder or checkpoints/latest")
    convert.add_argument("--workers", type=int, default=1, help="processes extracting and merging (default 1)")
    convert.add_argument("--checksums", action="store_true", help="verify every checkpoint file's CRC-32 first")
    convert.set_defaults(func=_convert)
    lineage = commands.add_parser("lineage", help="data lineage of an export bundle")
    lineage_commands = lineage.add_subparsers(dest="action", required=True)
    check = lineage_commands.add_parser("check", help="exit 1 if any entry of KEYS was consumed in pretraining")
    check.add_argument("bundle", help="export bundle folder (holds lineage.json)")
    check.add_argument("keys", help="text file, one sample key (or --by identity) per line")
    check.add_argument("--by", default="key", choices=["key", "patient", "study", "series", "slide", "source"],
                       help="what the file lists: sample keys (default), patient / study / series ids (raw DICOM ids "
                            "or the writers' hashes), slide ids or source file paths")
    check.set_defaults(func=_lineage)
    shards_cli.add_parsers(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pretrain`` console script."""
    _setup_logging()
    args = build_parser().parse_args(argv)
    from data_pipeline.errors import BadInputError
    from pretrain.config import ConfigError

    try:
        code = args.func(args)
    except (ConfigError, BadInputError, FileNotFoundError, AssertionError, ValueError) as exc:
        print(f"pretrain {args.command}: error: {exc}", file=sys.stderr)
        code = 2
    return code


def cli() -> None:
    """The console script: :func:`main`, then the end of the process (through :func:`pretrain.dist.leave` where
    it ran in a process group)."""
    try:
        code = main()
    except Exception:  # noqa: BLE001 - a crash of a process-group run, too, ends through dist.leave
        import traceback

        traceback.print_exc()
        code = 1
    dist = sys.modules.get("pretrain.dist")  # imported (with torch) only by commands that may join a group
    sys.exit(dist.leave(code) if dist else code)


if __name__ == "__main__":
    cli()
