"""The step loop: batch -> objective -> engine.backward/step -> after_step, with logging and checkpoints.

A non-finite loss on any rank skips that micro-batch on every rank (counted and
logged); ``train.max_nonfinite`` of them in a row stop the run with the last good
checkpoint left in place. What a checkpoint saves is the run state's parts
(pretrain/run_state.py); the stop signal is pretrain/preemption.py's.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from data_pipeline.pipelines import build_loader
from pretrain import bundles, checkpoint, dist, step_metrics, students
from pretrain.backbone import bind_kernels
from pretrain.checkpoint_writer import CheckpointWriteError, CheckpointWriter
from pretrain.config import RunConfig, flatten, to_yaml
from pretrain.engine import device, init_distributed, route_checkpoint_files
from pretrain.objectives import build_objective
from pretrain.preemption import STOPPED_MARKER, Preempted, StopSignal, clear_marker, stopped
from pretrain.probes import Prober
from pretrain.run_state import RunState, rng_state, seed_everything, set_rng_state
from pretrain.stages import Stages
from pretrain.teachers import partition_frozen
from pretrain.tracking import build_tracker, restart_tags, run_tags

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "Preempted", "STOPPED_MARKER", "Trainer", "views_to"]
"""What train() raises and leaves behind (main.py and launch/slurm_job.py import them from here)."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


@dataclass
class Step:
    """One optimizer step's work: its last micro-batch and outputs (one per unit), the losses (tensors: the
    units' mean, and each unit's) and sources of all its micro-batches, and a several-students objective's
    teacher and student counts."""

    batch: dict
    outs: list
    losses: list
    unit_losses: list
    sources: list
    elapsed: float
    counts: dict


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
        self.stop = StopSignal(cfg.train.stop_signal)
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.config_yaml = to_yaml(cfg)
        self.world = dist.world_size()
        seed_everything(cfg.seed, cfg.train.deterministic)
        self.objective = build_objective(cfg)
        self.units = students.units(self.objective, cfg)  # the models trained here, each its own engine
        self.plain = not self.units[0].name  # one model over every rank (not several students)
        resume_from = self._resume_path()
        self.init_from = self._init_encoders(resume_from)
        self.device = device()
        self.state = RunState(self.objective, self._build_engine(resume_from), self.world, dist.rank(),
                              cfg.data.num_workers, cfg.seed)
        self.progress, self.counters, self.lineage = self.state.progress, self.state.counters, self.state.lineage
        self.in_flight = None  # (host tensors, CUDA event): a batch's buffers with copies to the device pending
        self._write_config()
        if resume_from:
            checkpoint.load(self.engine if self.plain else None, resume_from, self.state,
                            () if self.plain else self.units)
            log.info("resumed from %s at step %d", resume_from, self.step)
            self._note_batch(resume_from)
        self.prober = (Prober(cfg.probe, cfg.data, self.objective.data_spec(), cfg.model.stems, cfg.seed)
                       if cfg.probe.shards else None)  # at the base config's input size in every stage
        self.stages = Stages(cfg)
        if self.stages.index(self.step):  # resumed inside a later stage: its settings, as at its switch
            self._take_stage()
        shards = self._start_loader()
        self.teacher_probed = False
        self._start_tracking(shards, resume_from)

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.progress.step

    @property
    def engine(self):
        """The (first) unit's DeepSpeed engine."""
        return self.units[0].engine

    @property
    def scheduler(self):
        """The (first) unit's learning-rate schedule."""
        return self.units[0].scheduler

    def _resume_path(self):
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        checksums = self.cfg.checkpoint.verify == "checksum"
        if resume == "auto":
            return checkpoint.find_latest(self.ckpt_dir, checksums)
        return checkpoint.resolve(resume, checksums)

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

    def _note_batch(self, resume_from: str) -> None:
        """Say so when a resume on another process count changed the global batch (the schedules go by step)."""
        saved = checkpoint.saved_world(resume_from)
        if saved != self.world and dist.is_main():
            log.warning("resumed on %d process(es) a run saved on %d: the global batch is now %d samples a step "
                        "(was %d); the lr and weight-decay schedules go on by step", self.world, saved,
                        self.cfg.data.batch_size * self.cfg.distributed.grad_accum * self.world,
                        checkpoint.saved_global_batch(resume_from))

    def _build_engine(self, resume_from: Optional[str]) -> list:
        """The DeepSpeed engine of every unit (kernels bound, blocks compiled if asked, optimizer and schedule
        built) on this process's device, ready to load ``resume_from``'s universal conversion where that is
        how it resumes. Returns the run's one model's optimizer parameter names by group, which the
        checkpoint records (export maps ZeRO-0 fp32 masters by them); [] for several students (their own)."""
        cfg = self.cfg
        compute = torch.bfloat16 if cfg.distributed.precision == "bf16" else torch.float32
        for network in self.objective.models():
            bind_kernels(network, self.device, compute)
        init_distributed(cfg.distributed.timeout_minutes)
        mpu = students.parallel_units(self.objective.groups) if not self.plain else None
        self.flops_per_step = 0.0  # one rank's, the planner's
        for unit in self.units:
            unit.mpu = mpu
            universal = self.plain and bool(resume_from) and checkpoint.needs_universal(resume_from, self.world)
            self.flops_per_step += students.build_engine(unit, self.world, universal, not self.plain)
        self.writer = CheckpointWriter(cfg.checkpoint.writer, dist.rank(), gpu=self.device.type == "cuda")
        for unit in self.units:
            route_checkpoint_files(unit.engine, self.writer)
        if self.device.type == "cuda":  # fp32 matmuls and convolutions on tensor cores (bf16 runs: the fp32 parts)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.objective.to(self.device)
        self.frozen_engines = partition_frozen(self.objective, cfg, self.world, self.device)
        return self.units[0].param_names if self.plain else []

    def _write_config(self) -> None:
        """The resolved config as <run>/config.yaml (rank 0; every rank waits for it)."""
        if dist.is_main():
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as handle:
                handle.write(self.config_yaml)
        dist.barrier()

    def _start_loader(self):
        """The loader over this rank's stream, from the run state's stream position (a resume's) on; returns
        the ShardList of all sources."""
        cfg = self.cfg
        self.loader, self.stream, shards = build_loader(cfg.data, self.objective.data_spec(), cfg.seed, dist.rank(),
                                                        self.world, self.state.stream.state, stems=cfg.model.stems,
                                                        stop_signal=cfg.train.stop_signal)
        self.state.stream.state = self.stream.state  # the live position, advanced batch by batch
        return shards

    def _take_stage(self) -> None:
        """The config of the stage that holds at this step, and the objective's settings from it."""
        self.cfg = self.stages.config(self.step)
        self.objective.reconfigure(self.cfg)
        # for mfu: the stage's crops and batch (one model: stages refuse several students)
        self.flops_per_step = students.flops_per_step(self.objective, self.cfg.data.batch_size, self.cfg)
        if dist.is_main():
            log.info("%s", self.stages.describe(self.stages.index(self.step)))

    def _next_stage(self):
        """At a stage's start, what a resume at this step does: its settings, the loader rebuilt from the stream
        position, the RNG states as they were (starting the workers draws from them); returns its batches."""
        self._take_stage()
        self._start_loader()
        kept = rng_state()
        batches = iter(self.loader)
        set_rng_state(kept)
        return batches

    def _start_tracking(self, shards, resume_from: Optional[str]) -> None:
        """Start the tracker (a resumed run continues its run id) and tag the run; clear a STOPPED marker.

        A new run logs its params, tags and config once; a continued one gets this job's tags.
        """
        cfg, resumed_id = self.cfg, self.state.tracked.run_id
        self.tracker = build_tracker(cfg.tracking, self.run_dir, cfg.name, dist.is_main(), resumed_id)
        self.state.tracked.run_id = dist.broadcast_object(self.tracker.run_id)
        if dist.is_main() and not resumed_id:
            self.tracker.log_params(flatten(cfg))
            self.tracker.set_tags(run_tags(self.world))
            self.tracker.log_artifact(os.path.join(self.run_dir, "config.yaml"))
            self.tracker.log_params({"data.shard_count": len(shards.urls),
                                     "data.manifest_samples": shards.manifest_samples,
                                     "data.source_files_skipped": shards.skipped_files})
        clear_marker(self.run_dir)
        if resume_from:
            self.tracker.set_tags({"resumed_from": os.path.basename(resume_from)})
        if self.init_from:
            self.tracker.set_tags({"init_from": self.init_from})
        if resumed_id:
            self.tracker.set_tags(run_tags(self.world))  # this job's SLURM id and nodes
        self.tracker.set_tags(restart_tags(self.step))

    def _save(self) -> str:
        return checkpoint.save(self.engine if self.plain else None, self.ckpt_dir, self.step, self.state,
                               self.config_yaml, self.cfg.checkpoint.keep_last, self.writer,
                               60.0 * self.cfg.distributed.timeout_minutes, () if self.plain else self.units)

    def _settle(self, failed: bool = False) -> None:
        """Wait for a checkpoint still being written in the background (every rank: complete, marker included,
        when this returns). After a failure: for at most a minute, and a failure to write is only logged."""
        if not failed:
            self.writer.wait()
            dist.barrier()
            return
        try:
            self.writer.wait(timeout=60.0)
        except CheckpointWriteError:
            log.exception("the last checkpoint was not written")

    def _forward(self, batch: dict) -> list:
        """Every unit's output on a micro-batch: several students' on their share of it, with the teacher's
        targets computed once."""
        if self.plain:
            return [self.objective(self.engine, batch, self.step)]
        shared = self.objective.share(batch)
        return [unit.objective(unit.engine, shared, self.step) for unit in self.units]

    def _micro_batch(self, batches):
        """The next micro-batch's outputs (one per unit), skipping (and counting) non-finite losses on any rank."""
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
            outs = self._forward(batch)
            finite = all(torch.isfinite(out.loss).item() for out in outs)
            if dist.all_reduce_max(0.0 if finite else 1.0) == 0.0:
                self.counters.consecutive_nonfinite = 0
                return batch, outs
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
        self.state.rng.restore()  # after iter(): starting DataLoader workers draws from the torch RNG
        metrics: dict = {}
        status = "FAILED"
        try:
            if self.prober and cfg.probe.every and self.step == 0:  # the untrained encoder: the curve's baseline
                self.tracker.log_metrics(self._probe(), 0)
            self.since_checkpoint = time.perf_counter()  # the wall time a checkpoint's save is a share of
            while self.step < cfg.train.steps:
                step = self._train_step(batches)
                stop = self.stop.agreed()
                done = self.step == cfg.train.steps
                logged = self._log(step, done)
                metrics = metrics if logged is None else logged
                self._log_images(step, done)
                saved = self._checkpoint(done)
                if not done and self.stages.begins(self.step):
                    batches = None  # the old loader's workers end
                    batches = self._next_stage()
                if stop and not done:
                    status = "KILLED"
                    self._stop(saved)
            self._settle()
            self._log_writes()
            status = "FINISHED"
        finally:
            if status == "FAILED":
                self._settle(failed=True)
            self.stop.restore()
            self.tracker.finish(status)
        return metrics

    def _train_step(self, batches) -> Step:
        """One optimizer step over ``grad_accum`` micro-batches.

        Nothing here waits on the device: the losses stay tensors until a logging step reduces them.
        """
        start = time.perf_counter()
        losses, unit_losses, sources = [], [], []
        for _ in range(self.cfg.distributed.grad_accum):
            batch, outs = self._micro_batch(batches)
            for unit, out in zip(self.units, outs):  # several students on one process: in turn
                unit.engine.backward(out.loss)
                unit.engine.step()
            unit_losses.append([out.loss.detach() for out in outs])
            losses.append(torch.stack(unit_losses[-1]).mean())
            sources.append(batch["source"])
        self.progress.step += 1
        for unit in self.units:
            unit.objective.after_step(self.step)
        elapsed = time.perf_counter() - start
        if len(self.stream.sources) > 1:
            self.progress.count_sources(sources)
        counts = {} if self.plain else self.objective.take_counts()
        return Step(batch, outs, losses, unit_losses, sources, elapsed, counts)

    def _log(self, step: Step, done: bool) -> Optional[dict]:
        """Track the step's metrics (every ``train.log_every`` steps and the last) and probes (every
        ``probe.every`` and the last); returns the metrics logged, probes included, or None."""
        cfg = self.cfg
        logged = self._metrics(step) if done or self.step % cfg.train.log_every == 0 else None
        if self.prober and ((cfg.probe.every and self.step % cfg.probe.every == 0) or done):
            probed = self._probe()
            if logged is None:
                self.tracker.log_metrics(probed, self.step)
            else:
                logged.update(probed)
        if logged is not None:
            if len(self.stages.configs) > 1:
                logged["stage"] = self.stages.index(self.step - 1)  # the stage the step ran in
            self.tracker.log_metrics(logged, self.step)
        return logged

    def _log_images(self, step: Step, done: bool) -> None:
        """The objective's images of the step's last batch, every ``train.image_every`` steps and at the last."""
        if (self.cfg.train.image_every and self.step % self.cfg.train.image_every == 0) or done:
            for name, image in self.units[0].objective.render(step.batch, step.outs[0]).items():
                self.tracker.log_image(name, image, self.step)

    def _checkpoint(self, done: bool) -> Optional[str]:
        """A checkpoint every ``checkpoint.every`` steps and at the last: its folder, or None. How long saving
        held the run is logged (``checkpoint_save_s``) with its share of the wall time since the last one
        (``checkpoint_save_share``): what says whether writing checkpoints in the background would pay."""
        if not ((self.cfg.checkpoint.every and self.step % self.cfg.checkpoint.every == 0) or done):
            return None
        self.tracker.flush(self.cfg.tracking.flush_timeout_s)  # a checkpoint's steps are tracked first
        start = time.perf_counter()
        path = self._save()
        now = time.perf_counter()
        interval, self.since_checkpoint = now - self.since_checkpoint, now
        self.tracker.log_metrics({"checkpoint_save_s": now - start, "checkpoint_save_share": (now - start) / interval,
                                  "checkpoint_background": float(self.writer.background)}, self.step)
        self._log_writes()
        self.writer.adapt(now - start, interval, dist.all_reduce_max)
        return path

    def _log_writes(self) -> None:
        """How long the background writes that finished took (``checkpoint_write_s``, at their steps)."""
        while self.writer.written:
            step, seconds = self.writer.written.pop(0)
            self.tracker.log_metrics({"checkpoint_write_s": seconds}, step)

    def _stop(self, saved: Optional[str]) -> None:
        """Some rank got the stop signal: checkpoint (unless this step just did), close the tracked run as
        KILLED, leave the STOPPED marker and raise :class:`Preempted` on every rank."""
        path = saved or self._save()
        self.writer.wait()
        log.warning("stop signal: checkpoint %s written at step %d; exiting for a requeue", path, self.step)
        self.tracker.finish("KILLED")
        stopped(self.run_dir, path)

    def _probe(self) -> dict:
        """kNN and linear-probe accuracy of the current encoder (every rank takes part)."""
        start = time.perf_counter()
        metrics = students.probe(self.prober, self.units, self.device)
        teacher = self.objective.teacher_encoder()
        if teacher is not None and not self.teacher_probed:  # a frozen distillation teacher: once, beside it
            probed = self.prober.measure(teacher, self.device, next(teacher.parameters()).dtype)
            metrics.update({f"teacher_{name}": value for name, value in probed.items()})
            self.teacher_probed = True
        metrics["probe_time_s"] = time.perf_counter() - start
        for unit in self.units if dist.is_main() else ():
            names = unit.prefixed({"probe_knn_acc": 0, "probe_linear_acc": 0, "probe_dense_miou": 0})
            shown = ", ".join(f"{label} {metrics[name]:.3f}" for label, name in zip(("kNN", "linear", "dense mIoU"),
                                                                                  names) if name in metrics)
            log.info("step %d probes%s: %s", self.step, f" ({unit.name})" * bool(unit.name), shown)
        return metrics

    def _metrics(self, step: Step) -> dict:
        """The step's metrics, reduced over the ranks (one collective), and a mixture's shares."""
        losses, sources, out, elapsed = step.losses, step.sources, step.outs[0], step.elapsed
        samples = self.cfg.data.batch_size * self.cfg.distributed.grad_accum * self.world
        grad_norm = self.engine.get_global_grad_norm() if self.plain else None  # several students: each its own
        names = [s.name for s in self.stream.sources] if len(self.stream.sources) > 1 else []
        state = self.stream.state
        counters = [state.skipped, state.shard_errors, state.retries] + [state.source_retries(n) for n in names]
        vector = step_metrics.pack(losses, sources, names, counters)
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
        metrics.update(out.metrics if self.plain else students.step_metrics(self.units, step.unit_losses, step.outs,
                                                                            step.counts))
        if self.cfg.train.peak_tflops > 0:
            metrics["mfu"] = self.flops_per_step / elapsed / (self.cfg.train.peak_tflops * 1e12)
        if self.device.type == "cuda":  # the allocator's peaks so far, as the planner estimates them
            metrics["gpu_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            metrics["gpu_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if dist.is_main():
            log.info("step %d loss %.4f lr %.2e %.0f samples/s", self.step, metrics["loss"], metrics["lr"],
                     metrics["samples_per_s"])
        return {**metrics, **(self.progress.shares(names) if names else {})}
