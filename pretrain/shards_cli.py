"""``pretrain shards``: raw data -> shards (here on every core, or as a SLURM array), resume, merge, inspect."""
from __future__ import annotations

import argparse

SOURCES = {
    "xray": ("DICOM / PNG / JPEG X-rays", "folder of X-ray files (searched recursively)"),
    "tiles": ("pathology tiles already cut from slides (JPEG / PNG, a folder per slide)",
              "folder of tiles (searched recursively; sub-folder = slide id)"),
    "ct": ("CT volumes: NIfTI files and DICOM series (grouped by SeriesInstanceUID) -> int16 HU",
           "folder of .nii/.nii.gz files and DICOM slices (searched recursively)"),
    "wsi": ("whole-slide images -> JPEG tissue tiles at a requested microns per pixel",
            "folder of slides (.svs, .tif, .ndpi, ...; searched recursively)"),
    "video": ("video clips (mp4 kept as is, or re-encoded with --max-side)",
              "folder of videos (.mp4, .mov, .mkv, .webm, .avi; searched recursively)"),
}
OPTIONS = ("labels", "masks", "mpp", "tile_size", "min_tissue", "source_mpp", "max_side", "encoding", "quality")
"""Command-line options that are options of a kind's sample maker (recorded in the plan)."""
ENCODING_DEFAULTS = {"xray": "png", "tiles": "as the files are", "wsi": "jpeg"}
"""The kinds that take ``--encoding``, with what they do without it."""


def add_parsers(commands) -> None:
    """The ``shards`` command and its sub-commands."""
    shards = commands.add_parser("shards", help="convert raw data into WebDataset shards")
    kinds = shards.add_subparsers(dest="modality", required=True)
    for modality, (summary, src_help) in SOURCES.items():
        _add_kind(kinds.add_parser(modality, help=summary), modality, src_help)
    resume = kinds.add_parser("resume", help="convert the parts of OUT not finished yet (all, or one task's)")
    resume.add_argument("out", help="the output folder of an earlier `pretrain shards KIND SRC OUT`")
    _add_workers(resume)
    resume.add_argument("--task", type=int, default=0, help="which task this is (0..tasks-1)")
    resume.add_argument("--tasks", type=int, default=1, help="tasks sharing the parts; with more than 1, no merge")
    resume.set_defaults(func=_resume)
    merge = kinds.add_parser("merge", help="merge the converted parts of OUT into its shards and manifest.json")
    merge.add_argument("out", help="the output folder of a conversion whose parts are all converted")
    merge.set_defaults(func=_merge)
    inspect = kinds.add_parser("inspect", help="summarise shards and draw a contact sheet of random samples")
    inspect.add_argument("url", help="shard URL(s), brace pattern, or folder / URL with manifest.json")
    inspect.add_argument("--sheet", default="contact_sheet.png", help="PNG contact sheet to write ('' = none)")
    inspect.add_argument("--samples", type=int, default=16, help="tiles on the contact sheet")
    inspect.add_argument("--seed", type=int, default=0, help="seed of the random choice of tiles")
    inspect.add_argument("--max-samples", type=int, default=0, help="read at most this many samples (0 = all)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=_inspect)


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, help="processes converting at once (default: the cores available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_kind(kind: argparse.ArgumentParser, modality: str, src_help: str) -> None:
    kind.add_argument("src", help=src_help)
    kind.add_argument("out", help="folder for the shards and manifest.json (run again to add new sources)")
    kind.add_argument("--samples-per-shard", type=int,
                      help="samples per shard (default: 256 images, 16 volumes, 32 clips)")
    kind.add_argument("--labels", help="CSV of path,label rows: writes a labelled set (e.g. for probes)")
    _add_workers(kind)
    kind.add_argument("--sources-per-part", type=int,
                      help="sources converted (and resumed) as one unit (default: one shard's worth; one slide)")
    kind.add_argument("--fresh", action="store_true", help="delete an earlier conversion in OUT and start over")
    kind.add_argument("--submit", metavar="PROFILE", help="convert as a SLURM array job of this cluster profile")
    kind.add_argument("--tasks", type=int, default=4, help="array tasks with --submit (default 4)")
    kind.add_argument("--dry-run", action="store_true", help="with --submit: write the scripts, do not submit")
    kind.set_defaults(func=_shards)
    if modality == "wsi":
        kind.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the tiles")
        kind.add_argument("--tile-size", type=int, default=224, help="tile side in pixels")
        kind.add_argument("--min-tissue", type=float, default=0.5, help="least tissue fraction of a kept tile")
        kind.add_argument("--source-mpp", type=float, help="microns per pixel of slides that do not say it")
    if modality == "video":
        kind.add_argument("--max-side", type=int, help="re-encode clips whose longer side exceeds this")
    if modality in ("xray", "tiles"):
        kind.add_argument("--masks", help="folder of segmentation masks (class-id PNGs at the sources' relative "
                          "paths): a labelled set for the dense probe")
    if modality == "ct":
        kind.add_argument("--masks", help="folder of label volumes (class-id NIfTI files at the volumes' relative "
                          "names, .nii.gz): a labelled set for the dense probe")
    if modality == "xray":
        kind.add_argument("--max-side", type=int,
                          help="resize images whose longer side exceeds this (training's resampling, kept 16-bit)")
    if modality in ENCODING_DEFAULTS:
        _add_encoding(kind, ENCODING_DEFAULTS[modality])


def _add_encoding(kind: argparse.ArgumentParser, default: str) -> None:
    from data_pipeline.encodings import ENCODINGS

    kind.add_argument("--encoding", choices=ENCODINGS, help=f"how images are stored (default {default}; png: "
                      "lossless, npy: raw pixels, no decode, most bytes; jpeg: 8-bit, lossy, fewest bytes)")
    kind.add_argument("--quality", type=int, help="JPEG quality with --encoding jpeg (default 90)")


def _shards(args) -> int:
    from data_pipeline.conversion import prepare, run_parts

    options = {name: getattr(args, name) for name in OPTIONS if getattr(args, name, None) is not None}
    plan = prepare(args.modality, args.src, args.out, args.samples_per_shard, args.sources_per_part, args.fresh,
                   options)
    if args.submit:
        return _submit(args, plan)
    converted = run_parts(args.out, plan, args.workers, not args.no_progress)
    print(f"{converted} part(s) converted ({len(plan['parts']) - converted} done earlier)")
    return _merge(args)


def _submit(args, plan: dict) -> int:
    from launch.submit_shards import submit_conversion

    result = submit_conversion(args.submit, args.out, args.tasks, dry_run=args.dry_run)
    print(f"{result['parts']} part(s) in {result['tasks']} task(s); scripts: {', '.join(result['scripts'])}")
    if result["job_id"]:
        print(f"submitted array job {result['job_id']} and merge job {result['merge_job_id']} (after it)")
    return 0


def _resume(args) -> int:
    from data_pipeline.conversion import load_plan, pending_parts, run_parts

    plan = load_plan(args.out)
    mine = len(range(args.task, len(plan["parts"]), args.tasks))
    done = mine - len(pending_parts(args.out, plan, args.task, args.tasks))
    print(f"task {args.task} of {args.tasks}: {done} of {mine} part(s) already converted", flush=True)
    run_parts(args.out, plan, args.workers, not args.no_progress, args.task, args.tasks)
    print(f"task {args.task} of {args.tasks}: all {mine} part(s) converted", flush=True)
    return _merge(args) if args.tasks == 1 else 0


def _merge(args) -> int:
    from data_pipeline.conversion import merge

    manifest = merge(args.out)
    print(f"{manifest['total_samples']} samples in {len(manifest['shards'])} shard(s) at {args.out}; "
          f"{len(manifest['skipped'])} source(s) skipped (listed in manifest.json)")
    return 0


def _inspect(args) -> int:
    import json

    from data_pipeline.inspect_shards import format_report, inspect_shards

    report = inspect_shards(args.url, args.sheet, samples=args.samples, seed=args.seed, max_samples=args.max_samples)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.sheet:
        print(f"contact sheet: {args.sheet}")
    return 0
