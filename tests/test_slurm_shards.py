"""A conversion as a SLURM array on a real controller and node daemon: 3 tasks, one requeued while it converts,
then the merge job after them; the shards and manifest are those of the same conversion in one process."""
import os
import subprocess
import time

import pytest

from data_pipeline import synthetic
from data_pipeline.conversion import WORK, convert, part_record
from tests.conftest import run_pretrain
from tests.slurm_cluster import running_cluster
from tests.system_deps import require
from tests.test_conversion import output
from tests.test_slurm import release_after_requeue, write_profile

CLIPS = 12
SETTINGS = ["--samples-per-shard", "2", "--sources-per-part", "1", "--max-side", "48"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require("slurm")
    with running_cluster(str(tmp_path_factory.mktemp("slurm_shards"))) as cluster:
        yield cluster


def task_log(out: str, task: int) -> str:
    folder = os.path.join(out, WORK, "slurm")
    return "".join(open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))
                   if name.endswith(f"_{task}.out"))


@pytest.mark.slow
def test_an_array_conversion_with_a_requeued_task_ends_with_the_single_process_manifest(slurm, tmp_path):
    src = tmp_path / "clips"
    src.mkdir()
    for index in range(CLIPS):  # each re-encoded (--max-side): about half a second a clip
        synthetic.write_video(str(src / f"clip_{index:02d}.mp4"), frames=120, seed=index)
    reference = str(tmp_path / "reference")
    expected = convert("video", str(src), reference, 2, sources_per_part=1, workers=1, progress=False, max_side=48)
    out = str(tmp_path / "out")
    submitted = run_pretrain(["shards", "video", str(src), out, *SETTINGS, "--submit", write_profile(tmp_path),
                              "--tasks", "3"])
    array, merge_job = submitted.stdout.split("submitted array job ")[1].split(" and merge job ")
    merge_job = merge_job.split()[0]
    task = f"{array}_1"  # parts 1, 4, 7, 10
    assert slurm.wait(task, states=("RUNNING",), timeout=120)["JobState"] == "RUNNING"
    for _ in range(2400):
        if part_record(out, 1) is not None or slurm.job(task).get("JobState") != "RUNNING":
            break
        time.sleep(0.05)
    assert slurm.job(task).get("JobState") == "RUNNING" and part_record(out, 10) is None, task_log(out, 1)
    subprocess.run(["scontrol", "requeue", task], env=slurm.env, check=True)  # killed mid-conversion
    release_after_requeue(slurm, task)
    merged = slurm.wait(merge_job, timeout=300)
    assert merged["JobState"] == "COMPLETED", (merged, [task_log(out, index) for index in range(3)])
    assert slurm.job(task)["Restarts"] == "1"
    log = task_log(out, 1)
    assert "task 1 of 3: 0 of 4 part(s) already converted" in log
    assert any(f"task 1 of 3: {done} of 4 part(s) already converted" in log for done in (1, 2, 3)), log
    assert output(out) == output(reference)
    assert open(os.path.join(out, "manifest.json")).read() == open(os.path.join(reference, "manifest.json")).read()
    assert expected["total_samples"] == CLIPS
