"""The step loop: batch -> objective -> engine.backward/step -> after_step, with logging and checkpoints.

A non-finite loss on any rank skips that micro-batch on every rank (counted and
logged); ``train.max_nonfinite`` of them in a row stop the run with the last good
checkpoint left in place.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.lineage import Lineage
from data_pipeline.pipelines import build_loader
from data_pipeline.stream_state import StreamState, rebalance
from pretrain import bundles, checkpoint, dist, step_metrics
from pretrain.backbone import bind_kernels, compile_blocks
from pretrain.config import RunConfig, flatten, to_yaml
from pretrain.engine import build_engine, deepspeed_config, device
from pretrain.objectives import build_objective
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.plan import step_flops, token_passes
from pretrain.probes import Prober
from pretrain.tracking import build_tracker, restart_tags, run_tags

log = logging.getLogger(__name__)


STOPPED_MARKER = "STOPPED"
"""File in the run folder saying the last run stopped on train.stop_signal after a checkpoint (resume it)."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


class Preempted(Exception):
    """The run stopped on the preemption / time-limit signal after writing a checkpoint (and STOPPED)."""


@dataclass
class Counters:
    """Run-wide counters carried in the checkpoint."""

    nonfinite: int = 0
    consecutive_nonfinite: int = 0


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch, numpy and Python; optionally force deterministic kernels.

    Deterministic cuBLAS needs its workspace size fixed before the first CUDA call
    (CUBLAS_WORKSPACE_CONFIG); a value the user exported is kept.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def views_to(batch: dict, device: torch.device) -> dict:
    """Move a batch's floating-point fields (views, MAE's noise) to ``device`` in place, in fp32: pixel
    targets (MAE norm-pix, VideoMAE) are computed from the views, and bf16 would drop the low bits of
    16-bit X-rays and narrow CT windows. The patch embedding casts the model's input to its weights'
    dtype. Masks, indices and seeds stay on the host: the objectives derive host-side values from
    them (iBOT's patch indices) before moving what the device needs."""
    for name, value in batch.items():
        if torch.is_tensor(value) and value.is_floating_point():
            batch[name] = value.to(device, torch.float32, non_blocking=True)
    return batch


class Trainer:
    """Builds the objective, engine, loader and tracker for a RunConfig and runs its steps."""

    def __init__(self, cfg: RunConfig):
        dist.ensure_env()  # rank and world size from torchrun, srun, or a lone process
        # From start-up on, the stop signal (SLURM's warning, or SIGTERM at preemption) asks for a checkpoint
        # at the first step instead of killing a run that is still building its engine or resuming.
        self.stop_requested = False
        self.stop_signal = signal.Signals[f"SIG{cfg.train.stop_signal}"]
        self.previous_handler = signal.signal(self.stop_signal, self._request_stop)
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.config_yaml = to_yaml(cfg)
        seed_everything(cfg.seed, cfg.train.deterministic)
        self.objective = build_objective(cfg)
        resume_from = self._resume_path()
        self.init_from = self._init_encoders(resume_from)
        module = self.objective.trainable()
        self.device = device()
        compute = torch.bfloat16 if cfg.distributed.precision == "bf16" else torch.float32
        for network in self.objective.models():
            bind_kernels(network, self.device, compute)
        if cfg.model.compile:
            log.info("torch.compile (%s): %d transformer blocks", cfg.model.compile_backend,
                     compile_blocks(module, cfg.model.compile_backend))
        depth = self.objective.encoder().depth
        optimizer = build_optimizer(module, cfg.optim, depth, offload=cfg.distributed.offload_optimizer != "none")
        names = {param: name for name, param in module.named_parameters()}
        self.optimizer_param_names = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        self.world = dist.world_size()
        self.flops_per_step = step_flops(token_passes(self.objective),
                                         cfg.data.batch_size) * cfg.distributed.grad_accum  # one rank's, the planner's
        self.engine = build_engine(module, optimizer, scheduler, deepspeed_config(cfg, self.world),
                                   cfg.distributed.timeout_minutes)
        self.scheduler = scheduler
        if self.device.type == "cuda":  # fp32 matmuls and convolutions on tensor cores (bf16 runs: the fp32 parts)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.objective.to(self.device)
        self.step = 0
        self.counters = Counters()
        self.source_batches: dict = {}  # micro-batches consumed per source (a mixture's shares)
        self.stream_state = None
        self.in_flight = None  # (host tensors, CUDA event): a batch's buffers with copies to the device pending
        self.resume_rng = None
        self.lineage = Lineage()
        run_id = None
        if dist.is_main():
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as handle:
                handle.write(self.config_yaml)
        dist.barrier()
        if resume_from:
            saved_world, objective_state = checkpoint.load(self.engine, resume_from)
            state = checkpoint.trainer_state(resume_from, dist.rank() if saved_world == self.world else 0)
            self.step = state["step"]
            self.resume_rng = state["rng"] if saved_world == self.world else None
            self.stream_state, self.lineage = self._resumed_stream(resume_from, state, saved_world)
            self.counters = Counters(**state["counters"])
            self.source_batches = dict(state.get("source_batches", {}))
            self.objective.load_state_dict(objective_state)
            run_id = state.get("mlflow_run_id")
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.loader, self.stream, shards = build_loader(cfg.data, self.objective.data_spec(), cfg.seed, dist.rank(),
                                                        self.world, self.stream_state, stems=cfg.model.stems,
                                                        stop_signal=cfg.train.stop_signal)
        self.prober = (Prober(cfg.probe, cfg.data, self.objective.data_spec(), cfg.model.stems, cfg.seed)
                       if cfg.probe.shards else None)
        self.tracker = build_tracker(cfg.tracking, self.run_dir, cfg.name, dist.is_main(), run_id)
        self.run_id = dist.broadcast_object(self.tracker.run_id)
        if dist.is_main() and not run_id:
            self.tracker.log_params(flatten(cfg))
            self.tracker.set_tags(run_tags(self.world))
            self.tracker.log_artifact(os.path.join(self.run_dir, "config.yaml"))
            self.tracker.log_params({"data.shard_count": len(shards.urls),
                                     "data.manifest_samples": shards.manifest_samples,
                                     "data.source_files_skipped": shards.skipped_files})
        if dist.is_main() and os.path.exists(os.path.join(self.run_dir, STOPPED_MARKER)):
            os.remove(os.path.join(self.run_dir, STOPPED_MARKER))  # this start continues that stop
        if resume_from:
            self.tracker.set_tags({"resumed_from": os.path.basename(resume_from)})
        if self.init_from:
            self.tracker.set_tags({"init_from": self.init_from})
        if run_id:
            self.tracker.set_tags(run_tags(self.world))  # this job's SLURM id and nodes
        self.tracker.set_tags(restart_tags(self.step))

    def _resume_path(self):
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            return checkpoint.find_latest(self.ckpt_dir)
        return checkpoint.resolve(resume)

    def _init_encoders(self, resume_from):
        """Load checkpoint.init_from into the objective's encoders on a fresh run (before the engine copies
        them); a resumed run keeps its own weights. Returns the folder loaded, or ''."""
        init_from = self.cfg.checkpoint.init_from
        if not init_from:
            return ""
        if resume_from:
            log.warning("checkpoint.init_from=%s ignored: resuming from %s", init_from, resume_from)
            return ""
        log.info(bundles.init_encoders(self.objective, init_from))
        return init_from

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "rng": checkpoint.rng_state(),
            "data": self.stream.state.to_dict(),
            "counters": vars(self.counters).copy(),
            "source_batches": dict(self.source_batches),
            "lineage": self.lineage.to_dict(),
            "mlflow_run_id": self.run_id,
            "optimizer_param_names": self.optimizer_param_names,  # export maps ZeRO-0 fp32 masters by them
        }

    def _resumed_stream(self, path: str, state: dict, saved_world: int) -> tuple:
        """(stream state, lineage) of this rank when resuming from checkpoint ``path``.

        Same process and worker counts: this rank's own (``state``). Others: every saved rank's
        stream rebalanced (data_pipeline.stream_state.rebalance: the rest of the current pass, read
        once) and every saved rank's lineage merged into rank 0's.
        """
        workers = self.cfg.data.num_workers
        own = StreamState.from_dict(state["data"])
        if saved_world == self.world and own.matches(self.world, workers):
            return own, Lineage(state["lineage"])
        states = checkpoint.trainer_states(path)
        saved = [StreamState.from_dict(s["data"]) for s in states]
        log.warning("resuming a stream saved by %d process(es) x %d reader(s) on %d x %d: the rest of the pass is "
                    "dealt out to the new readers", len(saved), saved[0].num_workers, self.world, max(1, workers))
        lineage = Lineage()
        if dist.is_main():
            for state in states:
                lineage.update(Lineage(state["lineage"]))
        return rebalance(saved, self.world, workers, dist.rank()), lineage

    def _save(self) -> str:
        return checkpoint.save(self.engine, self.ckpt_dir, self.step, self._trainer_state(),
                               self.objective.state_dict(), self.config_yaml, self.cfg.checkpoint.keep_last)

    def _micro_batch(self, batches):
        """The next micro-batch's output, skipping (and counting) non-finite losses on any rank."""
        while True:
            self._await_copies()
            batch = next(batches)
            self.stream.state.advance(batch["__reader__"], batch["__cursor__"])
            self.lineage.add_batch(batch["url"], batch["index"])
            hosts = [value for value in batch.values() if torch.is_tensor(value) and value.is_floating_point()]
            views_to(batch, self.device)
            if self.device.type == "cuda":  # the copies from (pinned) batch buffers run asynchronously
                event = torch.cuda.Event()
                event.record()
                self.in_flight = (hosts, event)
            out = self.objective(self.engine, batch, self.step)
            if dist.all_reduce_max(0.0 if torch.isfinite(out.loss).item() else 1.0) == 0.0:
                self.counters.consecutive_nonfinite = 0
                return batch, out
            self.counters.nonfinite += 1
            self.counters.consecutive_nonfinite += 1
            log.warning("non-finite loss at step %d (keys %s...): micro-batch skipped", self.step, batch["key"][:2])
            if self.counters.consecutive_nonfinite >= self.cfg.train.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.counters.consecutive_nonfinite} non-finite losses in a row at step {self.step}; "
                    f"stopping. The last good checkpoint is {checkpoint.find_latest(self.ckpt_dir)}"
                )

    def _await_copies(self) -> None:
        """Let go of the previous batch's host buffers (the workers reuse them once nothing here holds them)
        only when its copies to the device are done: waits for those copies, not for the step."""
        if self.in_flight is not None:
            self.in_flight[1].synchronize()
            self.in_flight = None

    def train(self) -> dict:
        """Run until ``train.steps``; returns the last logged metrics."""
        cfg = self.cfg
        batches = iter(self.loader)
        if self.resume_rng is not None:  # after iter(): starting DataLoader workers draws from the torch RNG
            checkpoint.set_rng_state(self.resume_rng)
        metrics: dict = {}
        status = "FAILED"
        try:
            if self.prober and cfg.probe.every and self.step == 0:  # the untrained encoder: the curve's baseline
                self.tracker.log_metrics(self._probe(), 0)
            while self.step < cfg.train.steps:
                batch, out, logged, stop = self._train_step(batches)
                done = self.step == cfg.train.steps
                if self.prober and ((cfg.probe.every and self.step % cfg.probe.every == 0) or done):
                    probed = self._probe()
                    if logged is None:
                        self.tracker.log_metrics(probed, self.step)
                    else:
                        logged.update(probed)
                if logged is not None:
                    self.tracker.log_metrics(logged, self.step)
                    metrics = logged
                if (cfg.train.image_every and self.step % cfg.train.image_every == 0) or done:
                    for name, image in self.objective.render(batch, out).items():
                        self.tracker.log_image(name, image, self.step)
                saved = None
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or done:
                    self.tracker.flush(cfg.tracking.flush_timeout_s)  # a checkpoint's steps are tracked first
                    saved = self._save()
                if stop and not done:
                    path = saved or self._save()
                    log.warning("stop signal: checkpoint %s written at step %d; exiting for a requeue", path, self.step)
                    status = "KILLED"
                    self.tracker.finish(status)
                    if dist.is_main():
                        with open(os.path.join(self.run_dir, STOPPED_MARKER), "w") as handle:
                            handle.write(f"{path}\n")
                    dist.barrier()
                    raise Preempted(path)
            status = "FINISHED"
        finally:
            signal.signal(self.stop_signal, self.previous_handler)
            self.tracker.finish(status)
        return metrics

    def _train_step(self, batches) -> tuple:
        """One optimizer step over ``grad_accum`` micro-batches: (the last batch, its output, the step's
        metrics or None when the step does not log, whether some rank got the stop signal).

        Outside logging steps nothing here waits on the device: the losses stay tensors, and the stop
        flag is agreed over the host group.
        """
        start = time.perf_counter()
        losses, sources = [], []
        for _ in range(self.cfg.distributed.grad_accum):
            batch, out = self._micro_batch(batches)
            self.engine.backward(out.loss)
            self.engine.step()
            losses.append(out.loss.detach())
            sources.append(batch["source"])
        self.step += 1
        self.objective.after_step(self.step)
        elapsed = time.perf_counter() - start
        shares = self._shares(sources)
        stop = dist.all_reduce_max(float(self.stop_requested)) > 0
        if self.step % self.cfg.train.log_every and self.step != self.cfg.train.steps:
            return batch, out, None, stop
        return batch, out, {**self._metrics(losses, sources, out, elapsed), **shares}, stop

    def _request_stop(self, signum, frame) -> None:
        """Signal handler: finish the current step, checkpoint, stop (every rank agrees through all-reduce)."""
        self.stop_requested = True

    def _probe(self) -> dict:
        """kNN and linear-probe accuracy of the current encoder (every rank takes part)."""
        start = time.perf_counter()
        encoder = self.objective.encoder()  # a teacher may keep fp32 weights under bf16 training
        metrics = self.prober.measure(encoder, self.device, next(encoder.parameters()).dtype)
        metrics["probe_time_s"] = time.perf_counter() - start
        if dist.is_main():
            log.info("step %d probes: kNN %.3f, linear %.3f", self.step, metrics["probe_knn_acc"],
                     metrics["probe_linear_acc"])
        return metrics

    def _shares(self, sources: list) -> dict:
        """A mixture's ``share/<source>``: the fraction of the batches so far drawn from each source."""
        if len(self.stream.sources) < 2:
            return {}
        for name in sources:
            self.source_batches[name] = self.source_batches.get(name, 0) + 1
        consumed = sum(self.source_batches.values())
        return {f"share/{s.name}": self.source_batches.get(s.name, 0) / consumed for s in self.stream.sources}

    def _metrics(self, losses, sources, out, elapsed: float) -> dict:
        samples = self.cfg.data.batch_size * self.cfg.distributed.grad_accum * self.world
        grad_norm = self.engine.get_global_grad_norm()
        names = [s.name for s in self.stream.sources] if len(self.stream.sources) > 1 else []
        vector = step_metrics.pack(losses, sources, names, [self.stream.state.skipped, self.stream.state.shard_errors])
        reduced = step_metrics.unpack(dist.all_reduce_tensor(vector).tolist(), names, self.world)
        metrics = {
            **reduced,
            "lr": max(self.scheduler.get_last_lr()),
            "step_time_s": elapsed,
            "samples_per_s": samples / elapsed,
            "nonfinite_skipped": float(self.counters.nonfinite),
        }
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        metrics.update(out.metrics)
        if self.cfg.train.peak_tflops > 0:
            metrics["mfu"] = self.flops_per_step / elapsed / (self.cfg.train.peak_tflops * 1e12)
        if self.device.type == "cuda":  # the allocator's peaks so far, as the planner estimates them
            metrics["gpu_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            metrics["gpu_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if dist.is_main():
            log.info("step %d loss %.4f lr %.2e %.0f samples/s", self.step, metrics["loss"], metrics["lr"],
                     metrics["samples_per_s"])
        return metrics
