"""A process that ran in a process group ends through pretrain.dist.leave: its exit code kept, its logs and
buffered output written, the interpreter's finalisation skipped (a gloo worker thread that outlives it aborts
the process); without a group leave only returns the code."""
import os
import subprocess
import sys

from pretrain import dist
from tests.conftest import REPO

SCRIPT = """
import logging, os, sys
import torch.distributed as tdist
from pretrain import dist
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist.free_port()))
tdist.init_process_group("gloo", rank=0, world_size=1)
dist.barrier()
dist.destroy()
import atexit
atexit.register(lambda: print("finalised", file=sys.stderr))
logging.getLogger("probe").info("logged before leaving")
sys.stdout.write("buffered, no newline")
dist.leave(3)
print("after leave")
"""


def test_leave_without_a_group_returns_the_code():
    assert not dist.is_initialized() and dist.leave(5) == 5


def test_leave_after_a_group_ends_the_process_with_its_code_and_its_output_written(tmp_path):
    log = tmp_path / "run.log"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, no newline"  # flushed into the pipe; nothing ran after leave
    assert "finalised" not in result.stderr  # no atexit hook, no finalisation
    assert "logged before leaving" in log.read_text()
