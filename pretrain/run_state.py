"""The trainer's checkpointed state as named parts, saved and loaded through :class:`RunState`.

As torchtitan's checkpoint manager takes a dict of "stateful" parts, :func:`pretrain.checkpoint.save`
and :func:`~pretrain.checkpoint.load` take one :class:`RunState`: each :class:`Part` gives its own
top-level entries of this rank's ``trainer_state_rank{R}.pt`` (``step``, ``counters``, ``rng``,
``data``...) and takes them back; the objective (an EMA teacher, centres) is the replicated part,
written in shares. A checkpoint written by another layout (another process count; for the stream
and its lineage, another reader count as well) reaches a part through :meth:`Part.load_resharded`
with every saved rank's entries. Every part loads in place: the trainer holds the parts.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol

import numpy as np
import torch

from data_pipeline.lineage import Lineage
from data_pipeline.stream_state import StreamState, rebalance
from pretrain import dist

log = logging.getLogger(__name__)


class Stateful(Protocol):
    """What a checkpoint saves and loads: the objective is one as it is."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Part:
    """A stateful part of this rank's trainer state.

    ``state_dict`` gives its entries, ``load_state_dict`` takes this rank's saved ones back. A part
    whose saved entries do not ``fit`` this run's layout (or any part, on another process count) is
    loaded by ``load_resharded`` from every saved rank's entries: by default rank 0's, for the state
    that the ranks share.
    """

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def fits(self, state: dict) -> bool:
        """Whether this rank's saved entries resume as they are (the process counts already match)."""
        return True

    def load_resharded(self, states: List[dict]) -> None:
        """Load from every saved rank's entries, in rank order: the checkpoint has another layout."""
        self.load_state_dict(states[0])


class Progress(Part):
    """The step and a mixture's micro-batches per source (``step``, ``source_batches``)."""

    def __init__(self):
        self.step = 0
        self.source_batches: dict = {}

    def count_sources(self, sources: list) -> None:
        """Count a step's micro-batches by the source they came from."""
        for name in sources:
            self.source_batches[name] = self.source_batches.get(name, 0) + 1

    def shares(self, names: list) -> dict:
        """``share/<source>``: the fraction of the micro-batches so far drawn from each source."""
        consumed = sum(self.source_batches.values())
        return {f"share/{name}": self.source_batches.get(name, 0) / consumed for name in names}

    def state_dict(self) -> dict:
        return {"step": self.step, "source_batches": dict(self.source_batches)}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.source_batches = dict(state.get("source_batches", {}))


@dataclass
class Counters(Part):
    """Run-wide non-finite loss counters (``counters``)."""

    nonfinite: int = 0
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict:
        return {"counters": vars(self).copy()}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(vars(Counters(**state["counters"])))


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


def rng_state() -> dict:
    """RNG states of torch (CPU and this process's CUDA device), numpy and Python in this process."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # drop path, masks drawn on the GPU
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (the CUDA state where both runs had one)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resume_seed(seed: int, step: int) -> int:
    """The seed of a resume at ``step`` that cannot restore the saved RNG states (another process count):
    derived from the run's seed and the step, so the resumed steps do not replay step 0's draws, and the
    same on every rank, as the run's seed is."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


class RandomState(Part):
    """This process's RNG states (``rng``). A loaded state waits for :meth:`restore`: starting the
    DataLoader's workers draws from the torch RNG. On another process count the saved states have no
    owner: the RNGs are seeded from the run's ``seed`` and the saved step instead (:func:`resume_seed`)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.loaded: Optional[dict] = None
        self.reseed: Optional[int] = None

    def state_dict(self) -> dict:
        return {"rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state["rng"]

    def load_resharded(self, states: List[dict]) -> None:
        self.loaded = None
        self.reseed = resume_seed(self.seed, states[0]["step"])

    def restore(self) -> None:
        """Set the loaded RNG states, or seed from the resumed step, if resumed (after the loader's workers
        started)."""
        if self.loaded is not None:
            set_rng_state(self.loaded)
        elif self.reseed is not None:
            torch.manual_seed(self.reseed)
            np.random.seed(self.reseed)
            random.seed(self.reseed)


class StreamPosition(Part):
    """This rank's data-stream position (``data``): the :class:`StreamState` the loader resumes from,
    then the live stream's (``state`` is set to it once the loader is built).

    Another process or worker count: every saved rank's stream is rebalanced (the rest of the
    current pass, read once; :func:`data_pipeline.stream_state.rebalance`).
    """

    def __init__(self, world: int, rank: int, workers: int):
        self.world, self.rank, self.workers = world, rank, workers
        self.state: Optional[StreamState] = None

    def state_dict(self) -> dict:
        return {"data": self.state.to_dict()}

    def fits(self, state: dict) -> bool:
        return StreamState.from_dict(state["data"]).matches(self.world, self.workers)

    def load_state_dict(self, state: dict) -> None:
        self.state = StreamState.from_dict(state["data"])

    def load_resharded(self, states: List[dict]) -> None:
        saved = [StreamState.from_dict(s["data"]) for s in states]
        log.warning("resuming a stream saved by %d process(es) x %d reader(s) on %d x %d: the rest of the pass is "
                    "dealt out to the new readers", len(saved), saved[0].num_workers, self.world, max(1, self.workers))
        self.state = rebalance(saved, self.world, self.workers, self.rank)


class RankLineage(Lineage, Part):
    """The samples this rank consumed (``lineage``). It records what this rank's readers read, so it
    follows the stream's layout: on another one, every saved rank's lineage is merged into rank 0's."""

    def __init__(self, stream: StreamPosition):
        super().__init__()
        self.stream = stream

    def state_dict(self) -> dict:
        return {"lineage": self.to_dict()}

    def fits(self, state: dict) -> bool:
        return self.stream.fits(state)

    def load_state_dict(self, state: dict) -> None:
        self.ranges = Lineage(state["lineage"]).ranges

    def load_resharded(self, states: List[dict]) -> None:
        self.ranges = {}
        if dist.is_main():
            for state in states:
                self.update(Lineage(state["lineage"]))


class TrackedRun(Part):
    """The tracker's run id (``mlflow_run_id``): a resumed run continues its MLflow run."""

    def __init__(self):
        self.run_id: Optional[str] = None

    def state_dict(self) -> dict:
        return {"mlflow_run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("mlflow_run_id")


class OptimizerParamNames(Part):
    """The optimizer's parameter names by group (``optimizer_param_names``): export maps a ZeRO-0 run's
    fp32 master weights by them. Saved only: every start takes them from its own optimizer. On another
    process count they are compared with this start's: the optimizer state is restored group by group,
    by index (a changed layer decay or frozen part regroups the parameters)."""

    def __init__(self, names: list):
        self.names = names

    def state_dict(self) -> dict:
        return {"optimizer_param_names": self.names}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to load: this start's optimizer gave the names."""

    def load_resharded(self, states: List[dict]) -> None:
        """Check that the saved groups hold the parameters this start's do.

        Raises:
            ValueError: they do not (the first group that differs).
        """
        saved = states[0].get("optimizer_param_names")
        if saved is None or saved == self.names:
            return
        differing = next(i for i in range(max(len(saved), len(self.names)))
                         if saved[i:i + 1] != self.names[i:i + 1])
        raise ValueError(f"the checkpoint's optimizer groups its parameters otherwise than this run's ({len(saved)} "
                         f"and {len(self.names)} groups, first differing at group {differing}): resume with the "
                         "settings it was saved with (optim.layer_decay, optim.weight_decay, frozen parts)")


class RunState:
    """The trainer's parts, by name: what a checkpoint saves and loads.

    Args:
        objective: the replicated part (the same on every rank), saved in shares.
        optimizer_param_names: the optimizer's parameter names by group.
        world, rank, workers: this run's process count, this process and its DataLoader workers.
        seed: the run's seed (a resume on another process count seeds its RNGs from it and the step).
    """

    def __init__(self, objective: Stateful, optimizer_param_names: list, world: int, rank: int, workers: int,
                 seed: int):
        self.world, self.rank = world, rank
        self.objective = objective
        self.progress, self.counters, self.rng = Progress(), Counters(), RandomState(seed)
        self.stream = StreamPosition(world, rank, workers)
        self.lineage = RankLineage(self.stream)
        self.tracked = TrackedRun()
        self.parts = {"progress": self.progress, "counters": self.counters, "rng": self.rng, "stream": self.stream,
                      "lineage": self.lineage, "tracked": self.tracked,
                      "optimizer": OptimizerParamNames(optimizer_param_names)}

    def rank_state(self) -> dict:
        """This rank's trainer state: every part's entries together."""
        state: dict = {}
        for part in self.parts.values():
            state.update(part.state_dict())
        return state

    def objective_state(self) -> dict:
        """The replicated objective state (each rank saves a share of it)."""
        return self.objective.state_dict()

    def load(self, saved_world: int, read_rank: Callable[[int], dict], objective_state: dict) -> None:
        """Load every part from a checkpoint written by ``saved_world`` processes, whose trainer states
        ``read_rank(rank)`` reads: this rank's own where the layout allows, else all of them (read once)."""
        own = read_rank(self.rank) if saved_world == self.world else None
        every = None
        for part in self.parts.values():
            if own is not None and part.fits(own):
                part.load_state_dict(own)
                continue
            every = every or [read_rank(rank) for rank in range(saved_world)]
            part.load_resharded(every)
        self.objective.load_state_dict(objective_state)
