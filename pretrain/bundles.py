"""Encoder bundles read back: the model settings and weights of a `pretrain import` folder or an export bundle,
and ``checkpoint.init_from``, which loads them into a fresh run's encoders before the engine is built."""
from __future__ import annotations

import os

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_CONFIG = "config.json"
IMPORT_RECORD = "import.json"
"""What `pretrain import` imported from where, and its parity check's outcome."""
BUNDLE_EXTRAS = "extras.safetensors"
"""Trained tensors beside the encoder (DINOv2's iBOT mask token), loaded where a module declares them in
``embedding_parameters``."""
MATCHED_FIELDS = ("frames", "tubelet_size", "embed_dim", "depth", "num_heads", "patch_size", "in_chans",
                  "num_registers", "ffn", "mlp_ratio", "layer_scale_init", "pos_embed", "norm_eps", "rope_base",
                  "key_bias")
FIELD_DEFAULTS = {"norm_eps": 1e-6, "rope_base": 100.0, "key_bias": True}
"""Values of matched fields that bundles leave out when they are the default."""
"""Model settings an imported encoder must share with the run (img_size may differ; LayerScale only
has to be on or off in both, its initial value being overwritten)."""


def encoder_fields(encoder, size: str = "B") -> dict:
    """The ``model.*`` settings that rebuild ``encoder`` (what import folders and export bundles record)."""
    fields = {"size": size, "embed_dim": encoder.embed_dim, "depth": encoder.depth, "num_heads": encoder.num_heads,
              "mlp_ratio": float(encoder.mlp_ratio), "patch_size": encoder.patch_size, "img_size": encoder.img_size,
              "in_chans": encoder.in_chans, "num_registers": encoder.num_registers,
              "layer_scale_init": float(encoder.layer_scale_init), "ffn": encoder.ffn,
              "pos_embed": encoder.pos_embed_mode, "frames": encoder.frames}
    if encoder.frames:
        fields["tubelet_size"] = encoder.tubelet
    if encoder.norm_eps != 1e-6:
        fields["norm_eps"] = encoder.norm_eps
    if not encoder.blocks[0].attn.key_bias:
        fields["key_bias"] = False
    if encoder.rope is not None:
        fields.update({f"rope_{name}": getattr(encoder.rope, name) for name in ("base", "shift", "jitter", "rescale")})
    return fields


def _derived_fields(config: dict, state: dict) -> dict:
    """``model.*`` settings of an export bundle written before bundles recorded them (``pretrain_model``):
    from its model_args and weight shapes."""
    from pretrain.models.pos_embed import fixed_mode
    from pretrain.models.blocks import mlp_ratio_for

    args = config["model_args"]
    dim = args["embed_dim"]
    hidden = state["blocks.0.mlp.fc2.weight"].shape[1]
    ffn = "swiglu" if state["blocks.0.mlp.fc1.weight"].shape[0] == 2 * hidden else "mlp"
    img = args["img_size"] if isinstance(args["img_size"], int) else args["img_size"][-1]
    fields = {"embed_dim": dim, "depth": args["depth"], "num_heads": args["num_heads"], "ffn": ffn,
              "mlp_ratio": mlp_ratio_for(ffn, dim, hidden), "patch_size": args["patch_size"], "img_size": img,
              "in_chans": args["in_chans"], "num_registers": args.get("num_registers", args.get("reg_tokens", 0)),
              "layer_scale_init": float(args.get("layer_scale_init", args.get("init_values")) or 0.0),
              "frames": args.get("frames", 0), "pos_embed": "sincos"}
    if fields["frames"]:
        fields["tubelet_size"] = args["tubelet"]
    else:
        side = img // args["patch_size"]
        fields["pos_embed"] = fixed_mode(state["pos_embed"][0], (side, side))
    return fields


def refuse_failed_import(folder: str) -> None:
    """Raise when ``folder`` is an import whose features differed from its source's beyond its tolerance."""
    import json

    from data_pipeline.errors import BadInputError

    path = os.path.join(folder, IMPORT_RECORD)
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        parity = json.load(handle).get("parity") or {}
    if parity.get("ok") is False:
        raise BadInputError(path, f"the import's features differ from its source's ({parity.get('reference')}) by "
                                  f"{parity.get('max_abs_difference'):.3g}, above its tolerance {parity.get('atol')}; "
                                  "import again with a larger --atol to accept the difference")


def read_bundle(folder: str) -> tuple:
    """(``model.*`` settings, encoder state dict with ``pos_embed`` [1, N, D]) of an import folder or
    export bundle.

    Raises:
        BadInputError: ``folder`` holds no config.json + model.safetensors of a ViT encoder.
    """
    import json

    from safetensors.torch import load_file

    from data_pipeline.errors import BadInputError

    paths = [os.path.join(folder, name) for name in (BUNDLE_CONFIG, BUNDLE_WEIGHTS)]
    if not all(os.path.isfile(path) for path in paths):
        raise BadInputError(folder, f"not an import folder or export bundle: it needs {BUNDLE_CONFIG} and "
                                    f"{BUNDLE_WEIGHTS} (write one with `pretrain import SOURCE OUT`)")
    refuse_failed_import(folder)
    with open(paths[0]) as handle:
        config = json.load(handle)
    state = load_file(paths[1])
    if "pretrain_model" in config:
        fields = dict(config["pretrain_model"])
        if fields.get("pos_embed") == "rope":  # written with timm Eva's LayerScale names
            from pretrain.export_rope import ours_from_timm

            state = ours_from_timm(state)
        return fields, state
    if "model_args" not in config or "blocks.0.mlp.fc2.weight" not in state:
        raise BadInputError(paths[0], "records neither pretrain_model nor the model_args of a ViT encoder")
    return _derived_fields(config, state), state


def _hidden(fields: dict) -> int:
    from pretrain.models.blocks import swiglu_hidden

    dim, ratio = fields["embed_dim"], fields["mlp_ratio"]
    return swiglu_hidden(dim, ratio) if fields["ffn"] == "swiglu" else int(dim * ratio)


def model_mismatch(run: dict, imported: dict) -> list:
    """[(field, the run's value, the import's value)] of the settings in :data:`MATCHED_FIELDS` that differ."""
    differ = []
    for name in MATCHED_FIELDS:
        default = FIELD_DEFAULTS.get(name, 0)
        mine, theirs = run.get(name, default), imported.get(name, default)
        if name == "layer_scale_init":
            same = (mine > 0) == (theirs > 0)
        elif name == "mlp_ratio":  # the same hidden width; at another width or ffn, the same ratio
            alike = all(run[k] == imported[k] for k in ("embed_dim", "ffn"))
            same = mine == theirs or (alike and _hidden(run) == _hidden(imported))
        else:
            same = mine == theirs
        if not same:
            differ.append((name, mine, theirs))
    return differ


def overrides(fields: dict) -> list:
    """The ``model.key=value`` overrides of ``model.*`` settings."""
    return [f"model.{name}={value}" for name, value in fields.items() if name != "frames" or value]


def build_encoder(fields: dict):
    """Our encoder for ``model.*`` settings, with PyTorch kernels (runs on any machine)."""
    from pretrain.models.vit import VisionTransformer

    return VisionTransformer(
        img_size=fields["img_size"], patch_size=fields["patch_size"], in_chans=fields["in_chans"],
        embed_dim=fields["embed_dim"], depth=fields["depth"], num_heads=fields["num_heads"],
        mlp_ratio=fields["mlp_ratio"], num_registers=fields["num_registers"],
        layer_scale_init=fields["layer_scale_init"], attn_backend="sdpa", ffn=fields["ffn"],
        frames=fields.get("frames", 0), tubelet=fields.get("tubelet_size", 2), norm_impl="torch",
        pos_embed_mode=fields["pos_embed"], norm_eps=fields.get("norm_eps", 1e-6),
        rope={name: fields[f"rope_{name}"] for name in ("base", "shift", "jitter", "rescale") if f"rope_{name}" in fields},
        key_bias=fields.get("key_bias", True))


def load_encoders(encoders: list, folder: str) -> str:
    """Load the encoder weights of import folder / export bundle ``folder`` into every encoder of
    ``encoders`` (built alike): :func:`load_weights`."""
    fields, state = read_bundle(folder)
    return load_weights(encoders, fields, state, folder)


def load_weights(encoders: list, fields: dict, state: dict, folder: str, key: str = "checkpoint.init_from") -> str:
    """Load an encoder state (``model.*`` settings ``fields``, read from ``folder``) into every encoder of
    ``encoders`` (built alike); a learned position table is resampled (bicubic) to their grid, a fixed
    one rebuilt for it. Extra patch-embedding stems (model.stems) keep their initialisation.

    Returns:
        What was done, for the log.

    Raises:
        ConfigError: the encoders' settings differ from the import's (naming the fields, with the
            overrides that match it); ``key`` is the setting that named ``folder``.
    """
    from pretrain.errors import ConfigError
    from pretrain.models.pos_embed import resample_2d

    state = dict(state)
    first = encoders[0]
    differ = model_mismatch(encoder_fields(first), fields)
    if differ:
        listed = ", ".join(f"{name} {mine} (import: {theirs})" for name, mine, theirs in differ)
        raise ConfigError(f"{key}={folder}: the run's model does not match the imported encoder: "
                          f"{listed}. Run with the import's settings: {' '.join(overrides(fields))}")
    table = state.pop("pos_embed", None)
    done = f"encoder weights from {folder}"
    if fields["pos_embed"] == "learned":
        side = fields["img_size"] // fields["patch_size"]
        if table is None or table.shape[1] != side * side:
            from data_pipeline.errors import BadInputError

            raise BadInputError(os.path.join(folder, BUNDLE_WEIGHTS), f"a learned position table of {side}x{side} "
                                f"patches is expected, found {None if table is None else tuple(table.shape)}")
        state["pos_embed"] = resample_2d(table[0], (side, side), tuple(first.grid))[None]
        if (side, side) != tuple(first.grid):
            done += f" (learned positions resampled from {side}x{side} to {first.grid[0]}x{first.grid[1]})"
    for encoder in encoders:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.startswith("stems.")]
        if missing or unexpected:
            raise ConfigError(f"{key}={folder}: the weights do not fit the run's encoder: missing "
                              f"{missing[:6]}, unexpected {unexpected[:6]}")
    if first.stems:
        done += f"; stems {sorted(first.stems)} keep their initialisation"
    return done


def init_encoders(objective, folder: str) -> str:
    """:func:`load_encoders` into every encoder of ``objective`` (DINOv2: student and teacher), before the
    engine is built; returns what was done."""
    encoders = list({id(e): e for e in objective.encoders().values()}.values())
    names = ", ".join(objective.encoders())
    done = f"{load_encoders(encoders, folder)} loaded into the {names} encoder(s)"
    return done + load_extras([objective.trainable(), *objective.frozen()], folder)


def load_extras(modules: list, folder: str) -> str:
    """Copy the import's extras (``extras.safetensors``) into the parameters that modules inside ``modules``
    declare in ``embedding_parameters`` under the same name (the DINOv2 student's and teacher's mask token);
    returns what was done ('' when nothing)."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(folder, BUNDLE_EXTRAS)
    if not os.path.isfile(path):
        return ""
    extras, loaded = load_file(path), set()
    for root in modules:
        for module in root.modules():
            for name in getattr(module, "embedding_parameters", ()):
                param = getattr(module, name)
                if name not in extras:
                    continue
                if extras[name].numel() != param.numel():
                    from pretrain.errors import ConfigError

                    raise ConfigError(f"{path}: {name} has shape {tuple(extras[name].shape)}, the run's "
                                      f"{tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(extras[name].reshape(param.shape))
                loaded.add(name)
    return f"; {', '.join(sorted(loaded))} from the import" if loaded else ""
