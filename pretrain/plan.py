"""``pretrain plan``: per-GPU memory and FLOPs of a run on a cluster profile, before it is submitted.

Model states (parameters, gradients, optimizer) follow from the parameter counts, the
precision and the ZeRO stage / offload; DeepSpeed's own estimators are printed beside them
for stages 2 and 3. Activations follow from the passes an objective declares as data
(:meth:`Objective.token_passes`: trunk, tokens, crops, the other tensors it keeps), turned into
numbers here (:class:`TokenPass`): for each transformer block, what autograd keeps for backward,
per token, in our block (fused attention: no attention matrix); a checkpointed block keeps only
its input. The estimate is checked in the tests against the bytes autograd
actually saves (:func:`saved_activation_bytes`) at small sizes.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from pretrain.objectives import TrunkPass, build_objective
from pretrain.plan_loader import LoaderOptions, format_loader, loader_estimate

GiB = 2**30


@dataclass
class TokenPass:
    """The planner's numbers for one pass of samples through a transformer trunk (:func:`token_pass`)."""

    name: str
    """What it is (encoder on visible patches, decoder, student local crops...)."""
    width: int
    depth: int
    heads: int
    hidden: int
    """Feed-forward hidden width (for SwiGLU: the width after gating)."""
    swiglu: bool
    tokens: int
    """Tokens per crop, prefix tokens included."""
    crops: int
    """Crops (views) per sample in this pass."""
    grad: bool = True
    """False for teacher passes: nothing is kept for backward."""
    checkpointed_blocks: int = 0
    """Blocks whose activations are recomputed in backward."""
    layer_scale: bool = False
    extra_per_crop: int = 0
    """Other activation elements kept per crop in the compute dtype (patch-embedding input, final norm, heads)."""
    fp32_per_crop: int = 0
    """Elements kept per crop in fp32 whatever the compute dtype: the loss's inputs and temporaries (logits
    cast to fp32 for the softmaxes, pixel targets and predictions)."""


def token_pass(p: TrunkPass) -> TokenPass:
    """The planner's numbers of an objective's pass: the trunk's width, depth, heads, FFN, LayerScale and
    activation checkpointing, and its other activations summed per crop by dtype."""
    from pretrain.models.blocks import swiglu_hidden

    vit = p.trunk
    swiglu = getattr(vit, "ffn", "mlp") == "swiglu"
    hidden = swiglu_hidden(vit.embed_dim, vit.mlp_ratio) if swiglu else int(vit.embed_dim * vit.mlp_ratio)
    every = getattr(vit, "activation_checkpointing", 0)
    elements = {fp32: sum(int(a.tokens * (a.count * a.width)) for a in p.activations if a.fp32 == fp32)
                for fp32 in (False, True)}
    return TokenPass(p.name, vit.embed_dim, vit.depth, vit.num_heads, hidden, swiglu, p.tokens, p.crops, p.grad,
                     len(range(0, vit.depth, every)) if every and p.grad else 0,
                     bool(getattr(vit, "layer_scale_init", 0)), elements[False], elements[True])


def token_passes(objective) -> List[TokenPass]:
    """The planner's numbers of every pass one sample of ``objective`` goes through per step."""
    return [token_pass(p) for p in objective.token_passes()]


def block_activation_elements(p: TokenPass) -> int:
    """Elements one block keeps for backward per crop (see module docstring).

    norm1 input, qkv input, the qkv output (q, k, v are views of it), attention output, proj input,
    norm2 input, fc1 input: 9 x width; GELU MLP: fc1 output + GELU output (2 x hidden); SwiGLU: the
    packed fc1 output, silu(gate) and the product (4 x hidden); LayerScale: 2 x width more.
    """
    per_token = 9 * p.width + (4 * p.hidden if p.swiglu else 2 * p.hidden) + (2 * p.width if p.layer_scale else 0)
    return p.tokens * per_token + p.heads * p.tokens  # + the attention kernel's log-sum-exp


def activation_bytes(passes: List[TokenPass], batch: int, bytes_per_element: int) -> int:
    """Activation memory of one micro-batch of ``batch`` samples (the fp32 loss terms at 4 bytes)."""
    total = 0
    for p in passes:
        if not p.grad:
            continue
        full = p.depth - p.checkpointed_blocks
        per_crop = full * block_activation_elements(p) + p.checkpointed_blocks * p.tokens * p.width
        total += batch * p.crops * ((per_crop + p.extra_per_crop) * bytes_per_element + 4 * p.fp32_per_crop)
    return total


def fp32_loss_bytes(passes: List[TokenPass], batch: int) -> int:
    """The part of :func:`activation_bytes` that the loss keeps in fp32."""
    return sum(batch * p.crops * 4 * p.fp32_per_crop for p in passes if p.grad)


def forward_flops(p: TokenPass) -> float:
    """Forward FLOPs of one crop through the trunk: the block matmuls and attention."""
    ffn = 3 * p.width * p.hidden if p.swiglu else 2 * p.width * p.hidden
    matmul_params = 4 * p.width * p.width + ffn
    return p.depth * (2 * p.tokens * matmul_params + 4 * p.tokens * p.tokens * p.width)


def step_flops(passes: List[TokenPass], batch: int) -> float:
    """FLOPs of one training micro-batch: forward + backward (2x forward) for trained passes, plus the
    recomputed forward of checkpointed blocks; forward only for teacher passes."""
    total = 0.0
    for p in passes:
        forward = forward_flops(p) * batch * p.crops
        recompute = forward * p.checkpointed_blocks / p.depth
        total += 3 * forward + recompute if p.grad else forward
    return total


def model_state_bytes(trainable: int, frozen: int, stage: int, world: int, bf16: bool,
                      offload_optimizer: bool, offload_param: bool = False, held: int = 0,
                      partitioned: int = 0) -> Dict[str, float]:
    """Per-GPU bytes of parameters, gradients and optimizer states (AdamW) for a ZeRO stage.

    bf16 keeps 2-byte parameters and gradients and fp32 master weights in the optimizer (4 + 4 + 4
    bytes); fp32 keeps 4-byte parameters and gradients and the two moments (4 + 4). ZeRO-1 shards
    the optimizer states, ZeRO-2 also the gradients, ZeRO-3 also the parameters. Optimizer offload
    (ZeRO-Offload) moves the optimizer states and, from ZeRO-2, the gradient partition off the GPU;
    ZeRO-3 parameter offload moves the parameter partition too (what stays is the gathered working
    set, :func:`gathered_bytes`). ``frozen`` (an EMA teacher) is one fp32 copy on every GPU. ``held``: parameters
    of the trained module without gradients (post-hoc registers' locked weights), weights only. ``partitioned``:
    the frozen parameters partitioned over the ranks (a large distillation teacher), in the training precision.
    """
    param_bytes = 2 if bf16 else 4
    optimizer_bytes = 12 if bf16 else 8
    optimizer_off = offload_optimizer and stage >= 1
    params = 0.0 if offload_param and stage >= 3 else (trainable + held) * param_bytes / (world if stage >= 3 else 1)
    grads = 0.0 if optimizer_off and stage >= 2 else trainable * param_bytes / (world if stage >= 2 else 1)
    optimizer = 0.0 if optimizer_off else trainable * optimizer_bytes / (world if stage >= 1 else 1)
    teacher = (frozen - partitioned) * 4.0 + partitioned * param_bytes / world
    return {"parameters": params, "gradients": grads, "optimizer": optimizer, "teacher": teacher}


def gathered_bytes(largest_layer: int, stage: int, bf16: bool, trainable: int = 0) -> float:
    """ZeRO-3's working set: the parameters held gathered, the largest module whole during its use or
    up to DeepSpeed's live-parameter limit (:data:`pretrain.engine.LIVE_ELEMENTS`), whichever is more."""
    from pretrain.engine import LIVE_ELEMENTS

    return max(largest_layer, min(LIVE_ELEMENTS, trainable)) * (2 if bf16 else 4) if stage == 3 else 0.0


CUDA_CONTEXT = 0.5 * GiB
"""The CUDA context with its kernel images (lazy loading), cuBLAS / cuDNN workspaces: an estimate."""
NCCL_PER_PEER_CHANNEL = 4 * 2**20
"""NCCL's default buffer (NCCL_BUFFSIZE) per channel and peer direction."""


def gpu_overheads(cfg, counts: Dict[str, int], world: int, gpus: bool) -> Dict[str, tuple]:
    """What a GPU run holds beside model states and activations: {term: (bytes, 'estimate' | 'exact')}.

    - CUDA context: an estimate (:data:`CUDA_CONTEXT`);
    - NCCL buffers: with more than one rank, 2 directions x 2 ring peers x 16 channels x
      NCCL_BUFFSIZE (an estimate: NCCL picks channels by topology);
    - ZeRO buckets (exact by DeepSpeed's settings, :data:`pretrain.engine.BUCKET_ELEMENTS`): ZeRO 1-2
      with overlapped communication double-buffer the reduce bucket in the reduction dtype; ZeRO-3
      also holds its prefetch bucket of gathered bf16/fp32 parameters;
    - fp32 gradient copies (exact): bf16 with fp32 reduction accumulates gradients in fp32, the whole
      model at ZeRO-1 (DeepSpeed's BF16 optimizer), one partition at ZeRO 2-3.
    """
    from pretrain.engine import BUCKET_ELEMENTS

    d = cfg.distributed
    bf16 = d.precision == "bf16"
    reduce_bytes = 4 if (not bf16 or d.reduce_dtype == "fp32") else 2
    terms = {"CUDA context": (CUDA_CONTEXT if gpus else 0.0, "estimate"),
             "NCCL buffers": (2 * 2 * 16 * NCCL_PER_PEER_CHANNEL if gpus and world > 1 else 0.0, "estimate")}
    buckets = 0.0
    if d.zero_stage >= 1:
        buckets = 2 * min(BUCKET_ELEMENTS, counts["trainable"]) * reduce_bytes
    if d.zero_stage == 3:
        buckets += min(BUCKET_ELEMENTS, counts["trainable"]) * (2 if bf16 else 4)
    terms["ZeRO buckets"] = (float(buckets), "exact")
    fp32_grads = 0.0
    if bf16 and d.reduce_dtype == "fp32" and d.zero_stage >= 1 and d.offload_optimizer == "none":
        fp32_grads = counts["trainable"] * 4.0 / (1 if d.zero_stage == 1 else world)
    terms["fp32 gradient copies"] = (fp32_grads, "exact")
    return terms


def parameter_counts(objective) -> Dict[str, int]:
    """Trainable, held (in the trained module without gradients), frozen (teacher) and largest-module parameter
    counts of an objective built on 'meta'."""
    module = objective.trainable()
    trainable = {id(p) for p in module.parameters()}
    frozen = {id(p): p.numel() for encoder in objective.encoders().values() for p in encoder.parameters()
              if id(p) not in trainable}
    for part in objective.frozen():  # an EMA teacher is more than its encoder: heads too
        frozen.update({id(p): p.numel() for p in part.parameters()})
    return {"trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "held": sum(p.numel() for p in module.parameters() if not p.requires_grad), "frozen": sum(frozen.values()),
            "largest_layer": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())}


def build_plan(cfg, profile, deepspeed_estimates: bool = True, loader: Optional[LoaderOptions] = None,
               world: Optional[int] = None, stage=None) -> dict:
    """Every number the planner prints, for a run config on a cluster profile (DeepSpeed's estimators
    import DeepSpeed, which prints its accelerator banner: ``deepspeed_estimates=False`` skips them).
    ``loader``: how the loader's cost is estimated (:mod:`pretrain.plan_loader`; default: from the rates
    file only, nothing measured); ``world``: the GPUs the model trains on where not all of the profile's
    (a distillation student's group); ``stage``: the config of one stage of a staged run (:mod:`pretrain.stages`),
    planned with the model of ``cfg``, as the run trains it."""
    from pretrain.engine import zero_model_state_estimate
    from pretrain.kernels import portable

    model_cfg = copy.deepcopy(cfg)
    portable(model_cfg.model)  # a login node plans a run whose apex / xformers kernels need the GPU nodes
    with torch.device("meta"):
        objective = build_objective(model_cfg)
    if stage is not None:
        objective.reconfigure(stage)
        cfg = stage
    counts = parameter_counts(objective)
    counts["partitioned"] = sum(p.numel() for m in objective.frozen_partitioned(profile.gpu_memory_gb * 1e9)
                                for p in m.parameters())
    passes = token_passes(objective)
    d = cfg.distributed
    world = world or profile.nodes * profile.processes_per_node
    bf16 = d.precision == "bf16"
    offload_optimizer, offload_param = d.offload_optimizer != "none", d.offload_param != "none"
    states = model_state_bytes(counts["trainable"], counts["frozen"], d.zero_stage, world, bf16,
                               offload_optimizer, offload_param, counts["held"], counts["partitioned"])
    states["gathered"] = gathered_bytes(counts["largest_layer"], d.zero_stage, bf16, counts["trainable"])
    element = 2 if bf16 else 4
    per_sample = activation_bytes(passes, 1, element)
    no_ckpt = activation_bytes([TokenPass(**{**vars(p), "checkpointed_blocks": 0}) for p in passes], 1, element)
    every = [TokenPass(**{**vars(p), "checkpointed_blocks": p.depth}) for p in passes]
    overheads = gpu_overheads(cfg, counts, world, profile.gpus_per_node > 0)
    capacity = profile.gpu_memory_gb * GiB * 0.95  # 5% for allocator slack and fragmentation
    static = sum(states.values()) + sum(value for value, _ in overheads.values())
    batch = cfg.data.batch_size
    flops = step_flops(passes, batch)
    return {
        "config": cfg.name, "objective": cfg.objective.name, "world": world, "zero_stage": d.zero_stage,
        "precision": d.precision, "offload_optimizer": d.offload_optimizer, "offload_param": d.offload_param,
        "micro_batch": batch,
        "gpu_memory_gb": profile.gpu_memory_gb, "counts": counts, "states": states,
        "overheads": {name: value for name, (value, _) in overheads.items()},
        "estimated_terms": [name for name, (_, kind) in overheads.items() if kind == "estimate"],
        **dict(zip(("deepspeed_host_estimate", "deepspeed_estimate"),
                   zero_model_state_estimate(counts["trainable"], counts["largest_layer"], d.zero_stage,
                                             profile.processes_per_node, profile.nodes, offload_optimizer,
                                             offload_param)
                   if deepspeed_estimates else (math.nan, math.nan))),
        "activations": per_sample * batch, "fp32_loss_temporaries": fp32_loss_bytes(passes, batch),
        "activations_without_checkpointing": no_ckpt * batch,
        "activations_checkpointing_every_block": activation_bytes(every, batch, element),
        "passes": [vars(p) for p in passes],
        "flops_per_micro_batch": flops, "flops_per_step": flops * d.grad_accum * world,
        "total": static + per_sample * batch,
        "largest_micro_batch": max(0, int((capacity - static) // per_sample)) if per_sample else 0,
        "fits": static + per_sample * batch <= capacity,
        "loader": loader_estimate(cfg, profile, objective.data_spec(), flops / batch, loader),
    }


def student_plans(cfg, profile, loader: Optional[LoaderOptions] = None) -> List[dict]:
    """Several distillation students (``objective.distill.students``): each one's plan on its group of the
    profile's GPUs, at its share of the global batch (``plan['student']`` names it)."""
    from pretrain.objectives.distill_students import student_config, student_groups, student_name

    world = profile.nodes * profile.processes_per_node
    specs = cfg.objective.distill.students
    plans = []
    for spec, ranks in zip(specs, student_groups(len(specs), world)):
        student = student_config(cfg, spec)
        student.data.batch_size = cfg.data.batch_size * world // len(ranks)
        plans.append({**build_plan(student, profile, loader=loader, world=len(ranks)), "student": student_name(spec)})
    return plans


def stage_plans(cfg, profile, loader: Optional[LoaderOptions] = None) -> List[dict]:
    """A staged run (``train.stages``): each stage's plan, the model of the base config under the stage's crops,
    batch and settings (``plan['stage']`` says which)."""
    from pretrain.stages import Stages

    stages = Stages(cfg)
    return [{**build_plan(stages.configs[0], profile, loader=loader, stage=staged if index else None),
             "stage": stages.describe(index)} for index, staged in enumerate(stages.configs)]


def format_plan(plan: dict) -> str:
    """The planner's table."""
    gib = lambda value: "n/a" if value != value else f"{value / GiB:8.2f} GiB"  # noqa: E731
    s, c = plan["states"], plan["counts"]
    lines = [
        f"plan for {plan['config']} ({plan['objective']}) on {plan['world']} GPU(s) of {plan['gpu_memory_gb']} GB: "
        f"ZeRO-{plan['zero_stage']}, {plan['precision']}, micro-batch {plan['micro_batch']}"
        + (f", optimizer states offloaded to {plan['offload_optimizer']}" if plan["offload_optimizer"] != "none" else "")
        + (f", parameters offloaded to {plan['offload_param']}" if plan["offload_param"] != "none" else ""),
        f"  parameters: {c['trainable'] / 1e6:.1f}M trained, "
        + (f"{c['held'] / 1e6:.1f}M held without gradients, " if c.get("held") else "")
        + f"{c['frozen'] / 1e6:.1f}M frozen (teacher), "
        f"largest module {c['largest_layer'] / 1e6:.1f}M",
        "  per GPU:",
        f"    parameters           {gib(s['parameters'])}",
        f"    gradients            {gib(s['gradients'])}",
        f"    optimizer states     {gib(s['optimizer'])}",
        (f"    teacher (partitioned){gib(s['teacher'])}   (ZeRO-3 over the ranks, {plan['precision']})"
         if c.get("partitioned") else f"    teacher (fp32)       {gib(s['teacher'])}"),
        f"    ZeRO-3 gathered      {gib(s['gathered'])}   (the live-parameter limit or the largest module)",
        f"    (DeepSpeed's estimate of model states: {gib(plan['deepspeed_estimate']).strip()} per GPU, "
        f"{gib(plan['deepspeed_host_estimate']).strip()} of host memory per node)",
        *[f"    {name:<20} {gib(value)}" + ("   (estimate)" if name in plan["estimated_terms"] else "")
          for name, value in plan["overheads"].items()],
        f"    activations          {gib(plan['activations'])}   (as configured)",
        f"      of which fp32 loss temporaries {gib(plan['fp32_loss_temporaries'])}",
        f"      without checkpointing  {gib(plan['activations_without_checkpointing'])}",
        f"      every block checkpointed {gib(plan['activations_checkpointing_every_block'])}",
        f"    total                {gib(plan['total'])}   of {plan['gpu_memory_gb']} GB",
        "  token passes per sample: " + "; ".join(
            f"{p['name']} {p['crops']} x {p['tokens']} tokens x {p['depth']} blocks of {p['width']}"
            + ("" if p["grad"] else " (no grad)") for p in plan["passes"]),
        f"  FLOPs: {plan['flops_per_micro_batch'] / 1e12:.2f} TFLOP per micro-batch, "
        f"{plan['flops_per_step'] / 1e15:.3f} PFLOP per optimizer step (all GPUs)",
        f"  largest micro-batch that fits: {plan['largest_micro_batch']}",
    ]
    if not plan["fits"]:
        lines.append(f"  WARNING: does not fit: {plan['total'] / GiB:.1f} GiB needed per GPU, "
                     f"{0.95 * plan['gpu_memory_gb']:.0f} GB usable; lower data.batch_size (at most "
                     f"{plan['largest_micro_batch']}), raise the ZeRO stage, or turn on activation checkpointing")
    return "\n".join(lines + format_loader(plan["loader"]))


@contextmanager
def saved_activation_bytes(*modules: torch.nn.Module) -> Callable[[], int]:
    """Count the bytes autograd saves for backward inside the block: unique storages, excluding those of
    the modules' parameters (a linear layer saves a transposed view of its weight, which is no activation).

    Yields a function returning the count so far.
    """
    seen: Dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for module in modules for p in module.parameters()}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield lambda: sum(seen.values())
