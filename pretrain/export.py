"""Export: a checkpoint (any ZeRO stage) -> fp32 encoder -> timm-named safetensors bundle.

The bundle folder holds::

    model.safetensors     encoder weights with timm VisionTransformer key names (rotary-position encoders,
                          model.pos_embed=rope: timm Eva's, :mod:`pretrain.export_rope`)
    config.json           the timm architecture and the arguments that rebuild it; pretrain_model: our
                          model.* settings (what checkpoint.init_from reads)
    preprocessing.json    how pixels were turned into model inputs in training
    MODEL_CARD.md         what was trained, on what, for how long
    lineage.json          the samples consumed so far (shard index ranges, keys, and the hashed patients /
                          studies / series, slides and source files they came from)
    hf/                   the same encoder for transformers: AutoModel.from_pretrained(bundle / "hf")
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

from safetensors.torch import save_file

from data_pipeline.lineage import Lineage
from pretrain import bundles, checkpoint, export_rope, students
from pretrain.config import load_config, source_channels
from pretrain.export_3d import config_3d, verify_3d
from pretrain.export_hf import verify, write_hf
from pretrain.kernels import portable
from pretrain.models.blocks import swiglu_hidden
from pretrain.restore import restore_objective
from pretrain.tracking import tracking_uri

log = logging.getLogger(__name__)

TIMM_ARCH = {
    "tiny": "vit_tiny_patch16_224", "S": "vit_small_patch16_224", "B": "vit_base_patch16_224",
    "L": "vit_large_patch16_224", "H": "vit_huge_patch14_224", "g": "vit_giant_patch14_224",
}


def timm_state_dict(encoder) -> dict:
    """Encoder weights under timm's names, including the position table [1, N, D] (fixed or learned; patches
    only: timm's ``no_embed_class=True``); rotary positions: timm Eva's names, no table."""
    if export_rope.is_rope(encoder):
        return export_rope.timm_state_dict(encoder)
    state = {name: tensor.detach().float().contiguous() for name, tensor in encoder.state_dict().items()}
    if encoder.pos_embed is not None:  # None: rotary positions (model.pos_embed=rope)
        state["pos_embed"] = encoder.pos_embed.detach().float().contiguous()
    return state


TIMM_SWIGLU_ARCH = "vit_giant_patch14_dinov2"
"""A timm architecture whose blocks use SwiGLUPacked (our SwiGLU layout); model_args set the sizes."""


def timm_config(model_cfg, encoder) -> dict:
    """timm architecture name and the keyword arguments that rebuild this encoder (rotary positions: a timm
    Eva, :func:`pretrain.export_rope.timm_config`)."""
    if export_rope.is_rope(encoder):
        return export_rope.timm_config(model_cfg, encoder)
    mlp_ratio = encoder.mlp_ratio
    if encoder.ffn == "swiglu":  # timm's packed width is int(dim * mlp_ratio): state it exactly
        mlp_ratio = (2 * swiglu_hidden(encoder.embed_dim, encoder.mlp_ratio) + 0.5) / encoder.embed_dim
    return {
        "architecture": TIMM_SWIGLU_ARCH if encoder.ffn == "swiglu" else TIMM_ARCH[model_cfg.size],
        "model_args": {
            "img_size": encoder.img_size, "patch_size": encoder.patch_size, "in_chans": encoder.in_chans,
            "embed_dim": encoder.embed_dim, "depth": encoder.depth, "num_heads": encoder.num_heads,
            "mlp_ratio": mlp_ratio, "class_token": True, "reg_tokens": encoder.num_registers,
            "no_embed_class": True, "init_values": encoder.layer_scale_init,  # 0.0 = none (timm drops None)
            "global_pool": "token", "num_classes": 0,
        },
        "num_features": encoder.embed_dim,
        "num_prefix_tokens": encoder.num_prefix_tokens,
        "features": "forward_features(x): [B, 1 + reg_tokens + patches, embed_dim], class token first",
    }


INTENSITY = {
    "xray": {
        "dicom": "modality LUT (rescale slope/intercept), then VOI LUT or window (min-max when absent), "
                 "MONOCHROME1 inverted so bone is bright, mapped linearly to uint16 0..65535",
        "png_jpeg": "16-bit kept; 8-bit multiplied by 257; colour converted to luminance",
        "to_float": "uint16 / 65535 -> [0, 1]",
    },
    "pathology": {
        "tiles": "RGB JPEG/PNG tiles as cut from the slides (bytes kept as written, or JPEG quality 90 from "
                 "`pretrain shards wsi` at the mpp in the tiles' metadata)",
        "to_float": "uint8 / 255 -> [0, 1], RGB channel order",
    },
    "ct": {
        "volume": "int16 Hounsfield units (DICOM modality LUT / NIfTI scl_slope+scl_inter), arrays [z, y, x] in "
                  "LPS order (x to patient left, y posterior, z superior)",
        "resample": "trilinear to ct.target_spacing [z, y, x] mm; outside the volume reads as ct.air_hu",
        "to_float": "each HU window [centre, width] -> clip((HU - centre + width/2) / width, 0, 1), one channel "
                    "per window; 2D models: ct.slices adjacent axial slices per window (window-major channels)",
    },
    "video": {
        "frames": "RGB frames decoded with FFmpeg (PyAV), picked by video.sampling (stride / segment)",
        "to_float": "uint8 / 255 -> [0, 1]; one crop shared by all frames",
    },
}
"""How each modality's stored pixels become floats in [0, 1]."""


def stem_source(cfg, stem: Optional[str]):
    """The (first) source of the run that goes through the stem an export writes: ``stem`` None, '' or
    data.modality is the main stem, else a key of model.stems.

    Raises:
        ValueError: ``stem`` is none of those, or no source of the run goes through it.
    """
    name = "" if stem in (None, "", cfg.data.modality) else stem
    if name and name not in cfg.model.stems:
        raise ValueError(f"--stem {stem!r}: this model has stems {[cfg.data.modality] + sorted(cfg.model.stems)}")
    for source in cfg.data.sources:
        if source.stem == name:
            return source
    raise ValueError(f"--stem {stem!r}: no source of this run goes through it, so its preprocessing is unknown")


def evaluation_input(model, data, modality: str) -> str:
    """How one sample becomes the encoder's input for features (what the probes use,
    ``ModalityPreparer.evaluate``): no augmentation, every choice centred."""
    if modality == "video":
        return (f"{model.frames} frames ({data.video.sampling} sampling, stride {data.video.stride}) "
                "centred in the clip; whole frames resized to img_size")
    if modality == "ct" and model.frames:
        return f"the centred {model.frames} x img_size x img_size crop at the target spacing, HU windows as channels"
    if modality == "ct":
        return "the middle slab of `slices` axial slices at the target spacing (windows x slices channels), resized"
    return "the whole image resized to img_size x img_size"


def preprocessing(cfg, stem: Optional[str] = None) -> dict:
    """The input contract a downstream user must reproduce (for the stem the export writes)."""
    data = stem_source(cfg, stem)
    modality, t = data.modality, data.transforms
    return {
        "modality": modality,
        "in_chans": source_channels(cfg.model, data),
        "img_size": cfg.model.img_size,
        "intensity": INTENSITY[modality],
        "resize": f"random resized crop (scale {list(t.crop_scale)}) in training; resize to img_size for features",
        "evaluation": evaluation_input(cfg.model, data, modality),
        "mean": list(t.mean),
        "std": list(t.std),
        "normalize": "(x - mean) / std per channel after scaling to [0, 1]",
        **({"frames": cfg.model.frames, "tubelet": cfg.model.tubelet_size,
            "input": "[B, C, frames, img_size, img_size]"} if cfg.model.frames else {}),
        **({"ct": dataclasses.asdict(data.ct)} if modality == "ct" else {}),
        **({"video": dataclasses.asdict(data.video)} if modality == "video" else {}),
    }


class TrackedRun:
    """The MLflow run a checkpoint belongs to (``run_id`` from the checkpoint's trainer state).

    The bundle on disk is what matters; tracking is a copy, so an unreachable store or a run
    without tracking gives warnings and empty answers, never a failed export.
    """

    def __init__(self, cfg, checkpoint_dir: str, run_id: Optional[str]):
        self.run_id = run_id if cfg.tracking.enabled else None
        self.store = None
        if self.run_id:
            from pretrain.tracking import StoredRun

            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))
            self.store = StoredRun(tracking_uri(cfg.tracking, run_dir), self.run_id)

    def summary(self) -> dict:
        """{'metrics': latest value of each metric, 'params': params} of the run ({} if unavailable)."""
        if self.store is None:
            return {}
        try:
            return self.store.summary()
        except Exception as exc:
            log.warning("MLflow run %s not readable: %s", self.run_id, exc)
            return {}

    def log_bundle(self, bundle: str, name: str) -> bool:
        """Add the bundle to the run as artifacts ``exports/<name>``."""
        if self.store is None:
            return False
        try:
            self.store.log_artifacts(bundle, f"exports/{name}")
        except Exception as exc:
            log.warning("export not logged to MLflow run %s: %s", self.run_id, exc)
            return False
        return True

    def register(self, model_name: str, name: str) -> Optional[str]:
        """Register the logged bundle ``exports/<name>`` as a new version of MLflow model ``model_name``.

        Returns:
            The version number, or None when the run is not tracked (a warning says why).
        """
        if self.store is None:
            log.warning("--register %s: the checkpoint's run is not tracked in MLflow", model_name)
            return None
        return self.store.register(model_name, f"exports/{name}", f"export bundle {name} (timm + transformers)")


CARD_METRICS = ("loss", "dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy", "prototypes_used",
                "decoder_loss", "visible_loss", "cls_loss", "patch_loss", "cosine_loss", "mse_loss",
                "high_norm_share", "teacher_high_norm_share",
                "probe_knn_acc", "teacher_probe_knn_acc", "probe_linear_acc", "teacher_probe_linear_acc",
                "probe_dense_miou", "teacher_probe_dense_miou",
                "samples_per_s", "skipped_samples")


def distillation(cfg, path: str) -> str:
    """The model card's distillation row: the teacher (and its fingerprint, from checkpoint ``path``), what was
    trained on it; '' for other objectives."""
    if cfg.objective.name != "distill":
        return ""
    d = cfg.objective.distill
    fingerprint = checkpoint.load_objective_state(path).get("teacher_fingerprint", "")
    if d.mode == "registers":
        how = (f"post-hoc registers ({cfg.model.num_registers} in all): {', '.join(d.unlock)} trained on the "
               f"teacher's patch tokens over {d.views} shifted / flipped views, cosine + {d.mse_weight:g} x mse")
    else:
        how = f"a new student, loss {d.loss}"
    return f"teacher `{d.teacher}` (SHA-256 of its weights {fingerprint[:16]}); {how}"


def model_card(cfg, encoder, step: int, world_size: int, source: str, run_id: Optional[str], summary: dict,
               weights: str = "student", teacher: str = "") -> str:
    """The bundle's MODEL_CARD.md: recipe, encoder, data, training length, final metrics, MLflow run (and the
    ``teacher`` row of a distillation, :func:`distillation`)."""
    params, metrics = summary.get("params", {}), summary.get("metrics", {})
    global_batch = cfg.data.batch_size * cfg.distributed.grad_accum * world_size
    sources = cfg.data.sources
    data = (", ".join(f"`{s.shards}` ({s.name}: {s.modality}, weight {s.weight:g})" for s in sources)
            if len(sources) > 1 else f"`{sources[0].shards}` ({sources[0].modality})")
    if "data.manifest_samples" in params:
        data += (f": {params['data.manifest_samples']} samples in the manifests, "
                 f"{params['data.source_files_skipped']} source files skipped at shard writing")
    rows = [
        ("recipe", f"{cfg.name}: {cfg.objective.name}, seed {cfg.seed}"),
        *([("distillation", teacher)] if teacher else []),
        ("encoder", f"ViT-{cfg.model.size}: width {encoder.embed_dim}, {encoder.depth} blocks, {encoder.num_heads} "
                    f"heads, patch {encoder.patch_size}, {encoder.img_size} px, {encoder.in_chans} channel(s), "
                    f"{encoder.num_registers} register(s)"),
        ("data", data),
        ("training", f"{step} steps x global batch {global_batch} ({world_size} process(es)) = "
                     f"{step * global_batch} samples seen; ZeRO-{cfg.distributed.zero_stage}, "
                     f"{cfg.distributed.precision}"),
        ("final metrics", ", ".join(f"{k} {metrics[k]:.4g}" for k in CARD_METRICS if k in metrics) or "not tracked"),
        ("MLflow run", run_id or "not tracked"),
        ("weights", f"{weights} encoder of the {cfg.objective.name} objective"),
        ("checkpoint", source),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        f"# {cfg.name}: {cfg.objective.name.upper()} ViT-{cfg.model.size} encoder\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        + (LOAD_3D if getattr(encoder, "frames", 0) else LOAD_2D)
        + "See preprocessing.json for the input contract. lineage.json lists the samples pretraining consumed and "
        "the (hashed) patients, studies, series, slides and source files they came from: "
        "`pretrain lineage check BUNDLE ids.txt --by patient` exits 1 if any listed patient was seen.\n"
    )


LOAD_2D = (
    "Load with timm: `timm.create_model(config['architecture'], pretrained=False, **config['model_args'])`, "
    "then `load_state_dict(safetensors.torch.load_file('model.safetensors'), strict=True)`; "
    "features are `forward_features(x)`.\n\n"
    "Load with transformers: `transformers.AutoModel.from_pretrained('hf')`; features are "
    "`last_hidden_state` (any pooler is untrained).\n\n"
)
LOAD_3D = (
    "A 3D (tubelet) encoder: rebuild it with `pretrain.export_3d.load_3d(bundle)` (the class in config['builder'] "
    "with config['model_args'], then the safetensors without `pos_embed`, strict); features are `forward(x)` "
    "on `[B, C, frames, H, W]`.\n\n"
)


def write_lineage(states: list, bundle: str) -> str:
    """``lineage.json``: the samples all ranks consumed up to the checkpoint, as ranges, keys and
    the identities (patients, studies, series, slides, source files) their metadata names."""
    lineage = Lineage()
    for state in states:
        lineage.update(Lineage(state.get("lineage", {})))
    path = os.path.join(bundle, "lineage.json")
    with open(path, "w") as handle:
        json.dump(lineage.manifest(), handle, indent=1)
    return path


def trained_objective(path: str) -> tuple:
    """(run config, the objective with the weights of checkpoint folder ``path``), built with portable kernels
    on meta parameters (:func:`pretrain.restore.restore_objective`)."""
    cfg = load_config(os.path.join(path, "config.yaml"))
    portable(cfg.model)  # apex / xformers kernels of the training cluster may not run here; weights are the same
    return cfg, restore_objective(cfg, path)


def trained_encoder(path: str, weights: Optional[str], stem: Optional[str]) -> tuple:
    """(run config, the encoder ``weights`` (None: the objective's default) with stem ``stem`` as a plain ViT,
    the encoder's name) of checkpoint folder ``path``, built with portable kernels.

    Raises:
        ValueError: an encoder or stem the run does not have.
    """
    cfg, objective = trained_objective(path)
    encoders = objective.encoders()
    weights = weights or next(iter(encoders))
    if weights not in encoders:
        raise ValueError(f"--weights {weights!r}: the {cfg.objective.name} objective has {list(encoders)}")
    written = stem_source(cfg, stem).stem  # a bad --stem fails before anything is written
    encoder = encoders[weights].eval()
    # with_stem copies the trunk to drop the other stems: one without extra stems is that plain ViT already
    return cfg, encoder.with_stem(written) if encoder.stems else encoder, weights


def export(checkpoint_path: str, out_dir: Optional[str] = None, check: bool = False,
           weights: Optional[str] = None, register: Optional[str] = None, stem: Optional[str] = None,
           checksums: bool = False, student: Optional[str] = None) -> dict:
    """Write the export bundle for a checkpoint folder (or run folder / latest pointer).

    Args:
        checkpoint_path: checkpoint folder, ``checkpoints`` folder, its ``latest`` file or a run folder.
        out_dir: bundle folder; defaults to ``<run>/exports/<checkpoint name>``.
        check: load the bundle back through timm and transformers and compare features with the
            training encoder (raises AssertionError over tolerance).
        weights: which of the objective's encoders to write (DINOv2: teacher or student); None = its default.
        register: also register the logged bundle as a new version of this MLflow model.
        stem: which patch-embedding stem to write with the trunk (a modality of a mixture); None = the
            main one (data.modality).
        checksums: also verify every file's CRC-32 against the checkpoint's marker (sizes always are); a
            damaged newest checkpoint of a run folder is passed over for the one before.
        student: which student of a several-students distillation to write (required there).

    Returns:
        {'bundle': folder, 'parity': max differences or None, 'mlflow_run_id': id or None,
        'model_version': registered version or None}.
    """
    path = checkpoint.resolve(checkpoint_path, checksums)
    model_path = students.student_folder(path, student) if student else path
    if not student and students.saved_students(path):
        raise ValueError(f"{path} holds several students {students.saved_students(path)}: name one (--student)")
    cfg, encoder, weights = trained_encoder(model_path, weights, stem)
    step = checkpoint.completed_step(path)
    if out_dir is None:
        out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "exports",
                               os.path.basename(path) + (f"_{student}" if student else ""))
    os.makedirs(out_dir, exist_ok=True)
    save_file(timm_state_dict(encoder), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    three_d = bool(getattr(encoder, "frames", 0))
    config = config_3d(encoder) if three_d else timm_config(cfg.model, encoder)
    config["pretrain_model"] = bundles.encoder_fields(encoder, cfg.model.size)
    documents = {"config.json": config, "preprocessing.json": preprocessing(cfg, stem)}
    for name, content in documents.items():
        with open(os.path.join(out_dir, name), "w") as handle:
            json.dump(content, handle, indent=2)
    states = checkpoint.trainer_states(path)
    tracked = TrackedRun(cfg, path, states[0].get("mlflow_run_id") if states else None)
    with open(os.path.join(out_dir, "MODEL_CARD.md"), "w") as handle:
        handle.write(model_card(cfg, encoder, step, len(states), os.path.abspath(model_path), tracked.run_id,
                                students.summary_of(tracked.summary(), student), weights,
                                distillation(cfg, model_path)))
    write_lineage(states, out_dir)
    if three_d:  # no timm / transformers class takes a tubelet stem: the bundle names ours
        parity = verify_3d(out_dir, encoder) if check else None
    else:
        write_hf(encoder, out_dir)
        parity = verify(out_dir, encoder) if check else None
    name = os.path.basename(path) + (f"_{student}" if student else "")
    logged = tracked.log_bundle(out_dir, name)
    version = tracked.register(register, name) if register and logged else None
    return {"bundle": out_dir, "parity": parity, "mlflow_run_id": tracked.run_id if logged else None,
            "model_version": version}
