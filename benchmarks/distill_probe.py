"""What distillation keeps, measured by the probes: a small student distilled from a trained teacher against the
same student trained from scratch for the same steps, and against shuffled labels.

On scikit-learn's digits (a real labelled set, 32 x 32): a 64-wide, 4-block MAE teacher is pretrained on the
images (labels unused); a 32-wide, 2-block student is then distilled from it (``feature`` and ``g2sd`` losses)
and the same student is pretrained with MAE from scratch, each for the same steps on 2 CPU processes. Every run
is probed at its end (kNN and linear probe of mean patch tokens on held-out digits; the distilled runs probe
their teacher too), and the distilled students once more on the same digits with shuffled labels (chance:
about 0.1). Three seeds by default (each run's seed: initialisation, augmentation, masks); the means and every
seed's numbers are written.

    .venv/bin/python benchmarks/distill_probe.py      # about 5 minutes here
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.report import RESULTS, write_report  # noqa: E402

CONFIGS = os.path.join(REPO, "pretrain", "configs")
COMMON = ["model.img_size=32", "model.patch_size=8", "data.batch_size=32", "data.num_workers=1",
          "data.split_by=sample", "data.transforms.crop_scale=[0.6,1.0]", "train.log_every=10",
          "checkpoint.every=0", "probe.every=0", "probe.linear_steps=200", "tracking.backend=jsonl"]
STUDENT = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]


def train(out: str, name: str, recipe: str, steps: int, *overrides: str) -> dict:
    """A 2-process run; its last probe metrics."""
    import json

    subprocess.run([sys.executable, "-m", "pretrain.main", "train", "--nproc", "2", "--config",
                    os.path.join(CONFIGS, f"{recipe}.yaml"), *COMMON, f"output_dir={out}", f"name={name}",
                    f"train.steps={steps}", *overrides], cwd=REPO, check=True, capture_output=True)
    with open(os.path.join(out, name, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    probed = {k: v for row in rows for k, v in row.items() if "probe" in k and "time" not in k}
    losses = [row["loss"] for row in rows if "loss" in row]
    return {**probed, "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}


def shuffled_probe(run: str, shards: str) -> dict:
    """The run's final encoder probed on the shuffled-label digits, in this process."""
    import torch

    from pretrain import checkpoint
    from pretrain.config import load_config
    from pretrain.probes import Prober
    from pretrain.restore import restore_objective

    folder = checkpoint.resolve(run)
    cfg = load_config(os.path.join(folder, "config.yaml"), [f"probe.shards={shards}"])
    objective = restore_objective(cfg, folder)
    prober = Prober(cfg.probe, cfg.data, objective.data_spec(), cfg.model.stems, cfg.seed)
    return prober.measure(objective.encoder(), torch.device("cpu"), torch.float32)


def digits(root: str) -> dict:
    from data_pipeline.writers import write_xray_shards
    from tests.conftest import write_digits

    out = {}
    for name, shuffle in (("true", False), ("shuffled", True)):
        labels = write_digits(os.path.join(root, f"raw_{name}"), 1000, shuffle_labels=shuffle)
        out[name] = os.path.join(root, name)
        write_xray_shards(os.path.join(root, f"raw_{name}"), out[name], 250, progress=False, labels=labels)
    write_xray_shards(os.path.join(root, "raw_true"), os.path.join(root, "images"), 250, progress=False)
    out["images"] = os.path.join(root, "images")
    return out


def one_seed(work: str, sets: dict, seed: int, teacher_steps: int, steps: int) -> dict:
    """Teacher, scratch student and the two distilled students of one seed."""
    data = [f"data.shards={sets['images']}", f"probe.shards={sets['true']}", f"seed={seed}"]
    runs = os.path.join(work, f"runs_{seed}")
    out = {"teacher": train(runs, "teacher", "mae_tiny_cpu", teacher_steps, *data, "model.depth=4",
                            "objective.mae.decoder_dim=32")}
    teacher = [f"objective.distill.teacher={os.path.join(runs, 'teacher')}"]
    out["scratch_mae"] = train(runs, "scratch", "mae_tiny_cpu", steps, *data, *STUDENT, "objective.mae.decoder_dim=32")
    for loss in ("feature", "g2sd"):
        extra = ["objective.distill.decoder_dim=32", "objective.distill.decoder_heads=2",
                 "objective.distill.teacher_decoder_blocks=1"] if loss == "g2sd" else []
        name = f"distilled_{loss}"
        out[name] = train(runs, name, f"distill_{loss}_tiny_cpu", steps, *data, *STUDENT, *teacher, *extra)
        out[name]["shuffled_labels"] = shuffled_probe(os.path.join(runs, name), sets["shuffled"])
    return out


def means(per_seed: list) -> dict:
    """Each run's probe accuracies averaged over the seeds."""
    out = {}
    for run in per_seed[0]:
        keys = [k for k in per_seed[0][run] if k.endswith("_acc")]
        out[run] = {k: round(sum(seed[run][k] for seed in per_seed) / len(per_seed), 4) for k in keys}
        if "shuffled_labels" in per_seed[0][run]:
            out[run]["shuffled_labels"] = {k: round(sum(seed[run]["shuffled_labels"][k] for seed in per_seed)
                                                    / len(per_seed), 4) for k in per_seed[0][run]["shuffled_labels"]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=os.path.join(RESULTS, "distill_probe.json"))
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="distill_probe_")
    sets = digits(os.path.join(work, "data"))
    per_seed = [one_seed(work, sets, seed, args.teacher_steps, args.steps) for seed in args.seeds]
    report = {"machine": platform.processor() or platform.machine(), "teacher_steps": args.teacher_steps,
              "student_steps": args.steps, "seeds": args.seeds,
              "set": "scikit-learn digits, 1000 (probe: hashed bank / query split)",
              "mean": means(per_seed), "per_seed": per_seed}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
