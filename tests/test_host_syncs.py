"""Outside logging steps the training step does not wait on the device: the calls that would (Tensor.item,
tolist, __float__, __bool__, __int__) made by pretrain/ code during non-logging steps are counted for each
objective in a real in-process Trainer (one gloo process, the loader in a DataLoader worker) and held to a
budget.

BUDGET: one call per micro-batch, the non-finite decision. A non-finite loss skips its micro-batch
before backward, so the host must know the loss is finite before it launches the backward pass;
DeepSpeed offers no way to skip an optimizer step on the device. Everything else (masks, metrics, the
stop flag, the step's metrics vector) stays on the device or goes over the host group until a logging
step. DeepSpeed's own calls are not ours and are not counted.
"""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from pretrain import dist
from pretrain.config import load_config
from pretrain.dist import free_port
from tests.conftest import REPO

COUNTED = ("item", "tolist", "__float__", "__bool__", "__int__")
HOST_HELPERS = ("all_reduce_max", "all_reduce_sum")
"""pretrain.dist's helpers for host values: they reduce CPU tensors over the gloo host group, so reading the
result waits on no device. (data_pipeline/ code in the training process only handles the host batches the
workers send, before they move to the device: not counted either.)"""
BUDGET_PER_MICRO_BATCH = 1
RECIPES = {"mae": "mae_tiny_cpu", "dinov2": "dinov2_tiny_cpu", "videomae_v2": "videomae_v2_tiny_ct_cpu"}


class HostReads:
    """Counts the counted Tensor calls made from pretrain/ and data_pipeline/ code on the training thread
    while the trainer is between logging work, by the step the trainer is at."""

    def __init__(self, monkeypatch):
        self.calls, self.trainer, self.logging = [], None, 0
        for name in COUNTED:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if (self.trainer is not None and not self.logging and module.startswith("pretrain")
                    and caller.f_code.co_name not in HOST_HELPERS
                    and threading.current_thread() is threading.main_thread()):
                self.calls.append((self.trainer.step, name, f"{module}:{caller.f_lineno}"))
            return original(tensor, *args, **kwargs)
        return counted

    def during(self, owner, method: str, monkeypatch) -> None:
        """Calls inside ``owner.method`` are logging work (metrics, probes, images, checkpoints): not counted."""
        original = getattr(owner, method)

        def logging(*args, **kwargs):
            self.logging += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.logging -= 1
        monkeypatch.setattr(owner, method, logging)


def count_host_reads(objective: str, shards: str, out_dir: str, steps: int, grad_accum: int) -> list:
    """Train ``objective``'s tiny recipe in this process and return the counted calls (step, name, where)."""
    import pytest as _pytest

    from pretrain.objectives.base import Objective
    from pretrain.trainer import Trainer

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cfg = load_config(os.path.join(REPO, "pretrain", "configs", f"{RECIPES[objective]}.yaml"), [
        f"output_dir={out_dir}", "name=syncs", f"data.shards={shards}", "data.num_workers=1", "data.batch_size=4",
        f"train.steps={steps}", f"train.log_every={steps}", "checkpoint.every=0", "tracking.enabled=false",
        f"distributed.grad_accum={grad_accum}", "train.image_every=0"])
    with _pytest.MonkeyPatch.context() as patch:
        reads = HostReads(patch)
        for method in ("_metrics", "_probe", "_save"):
            reads.during(Trainer, method, patch)
        reads.during(Objective, "render", patch)
        trainer = Trainer(cfg)
        reads.trainer = trainer
        try:
            trainer.train()
        finally:
            dist.destroy()
    return reads.calls


@pytest.mark.parametrize("objective", sorted(RECIPES))
def test_non_logging_steps_read_the_device_once_per_micro_batch(objective, xray_shards, ct_shards, tmp_path):
    shards = ct_shards if objective == "videomae_v2" else xray_shards
    steps, grad_accum = 5, 2
    result = tmp_path / "calls.json"
    code = (f"import json; from tests.test_host_syncs import count_host_reads; json.dump(count_host_reads("
            f"{objective!r}, {shards!r}, {str(tmp_path)!r}, {steps}, {grad_accum}), open({str(result)!r}, 'w'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = json.loads(result.read_text())
    middle = range(1, steps - 1)  # steps 2..4 (the first may initialise lazily; the last logs)
    counted = [call for call in calls if call[0] in middle]
    assert len(counted) <= BUDGET_PER_MICRO_BATCH * grad_accum * len(middle), counted
    assert all(where.startswith("pretrain.trainer:") for _, _, where in counted), counted  # the finite check only
