"""Conversion in parts (data_pipeline/conversion.py): the same shards on 1 or 2 processes and across tasks, a
converter killed with SIGKILL and run again ends with the shards of an uninterrupted run, a rerun over an
archive with new files converts only them, and the errors name what to do."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from data_pipeline import synthetic
from data_pipeline.conversion import WORK, convert, load_plan, merge, part_record, prepare, run_parts
from data_pipeline.errors import BadInputError
from tests.conftest import REPO, make_xray_folder, run_pretrain


def output(out: str) -> dict:
    """{file name: bytes} of the shards and manifest in ``out`` (the work folder left out)."""
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out)) if name != WORK}


def keys(out: str) -> list:
    """Every sample key of every shard in ``out``, in order (duplicates kept)."""
    found = []
    for name in sorted(n for n in os.listdir(out) if n.endswith(".tar")):
        with tarfile.open(os.path.join(out, name)) as tar:
            found.extend(dict.fromkeys(member.name.split(".", 1)[0] for member in tar.getmembers()))
    return found


def write_sources(kind: str, folder: str, count: int) -> str:
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        if kind == "ct":
            synthetic.write_nifti(os.path.join(folder, f"vol_{index:02d}.nii.gz"), shape=(8, 24, 24), seed=index)
        elif kind == "wsi":
            synthetic.write_slide(os.path.join(folder, f"slide_{index:02d}.tif"), 384, 256, mpp=0.5, seed=index,
                                  levels=2)
        elif kind == "video":
            synthetic.write_video(os.path.join(folder, f"clip_{index:02d}.mp4"), frames=8, seed=index)
    return folder


SMALL = {  # kind -> (sources, samples per shard, options)
    "ct": (5, 2, {}),
    "wsi": (3, 8, {"tile_size": 64}),
    "video": (5, 2, {}),
}


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_two_processes_write_the_bytes_one_process_writes(kind, tmp_path):
    count, per_shard, options = SMALL[kind]
    src = write_sources(kind, str(tmp_path / "src"), count)
    one = convert(kind, src, str(tmp_path / "one"), per_shard, workers=1, progress=False, **options)
    two = convert(kind, src, str(tmp_path / "two"), per_shard, workers=2, progress=False, **options)
    assert one == two and one["total_samples"] >= count
    assert output(str(tmp_path / "one")) == output(str(tmp_path / "two"))
    assert one["conversion"]["parts"] == (count if kind == "wsi" else -(-count // per_shard))


def test_tasks_write_the_shards_of_one_process_and_merge_refuses_while_parts_are_missing(tmp_path):
    src = make_xray_folder(str(tmp_path / "src"), 9)
    reference = convert("xray", src, str(tmp_path / "one"), 2, workers=1, progress=False)
    out = str(tmp_path / "tasks")
    plan = prepare("xray", src, out, 2, None, False, {})
    assert len(plan["parts"]) == 5
    run_parts(out, plan, 1, False, task=1, tasks=3)  # parts 1 and 4
    assert [part_record(out, index) is not None for index in range(5)] == [False, True, False, False, True]
    with pytest.raises(BadInputError, match=r"3 of 5 part\(s\) not converted yet.*pretrain shards resume") as info:
        merge(out)
    assert info.value.where == out
    run_parts(out, plan, 1, False, task=0, tasks=3)
    run_parts(out, plan, 1, False, task=2, tasks=3)
    assert merge(out) == reference and merge(out) == reference  # a second merge finds the shards moved
    assert output(out) == output(str(tmp_path / "one"))


def test_another_kind_or_option_is_refused_without_fresh(tmp_path):
    src = make_xray_folder(str(tmp_path / "src"), 3)
    out = str(tmp_path / "out")
    convert("xray", src, out, 2, workers=1, progress=False)
    with pytest.raises(BadInputError, match="kind: 'xray' there, 'tiles' now"):
        convert("tiles", src, out, 2, workers=1, progress=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"cxr_{index:03d}.png,{index % 2}\n" for index in range(3)))
    with pytest.raises(BadInputError, match="options: .*labels"):
        convert("xray", src, out, 2, workers=1, progress=False, labels=str(labels))
    with pytest.raises(ValueError, match=r"options \['tile_size'\] are not options of this kind"):
        convert("xray", src, out, 2, workers=1, progress=False, tile_size=3)
    manifest = convert("xray", src, out, 2, workers=1, progress=False, fresh=True, labels=str(labels))
    assert manifest["conversion"]["options"] == {"labels": str(labels), "max_side": None, "encoding": "png",
                                                 "quality": 90, "masks": None}
    plan_file = os.path.join(out, WORK, "plan.json")  # a plan made before encoding and quality existed
    plan = json.load(open(plan_file))
    plan["options"] = {"labels": str(labels), "max_side": None}
    json.dump(plan, open(plan_file, "w"))
    with pytest.raises(BadInputError, match="other settings .*'encoding': 'png'.* there, .*'encoding': 'npy'"):
        convert("xray", src, out, 2, workers=1, progress=False, labels=str(labels), encoding="npy")
    again = convert("xray", src, out, 2, workers=1, progress=False, labels=str(labels))
    assert again["conversion"]["options"] == manifest["conversion"]["options"]


def start_converter(src: str, out: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pretrain.main", "shards", "xray", src, out, "--samples-per-shard",
                             "2", "--sources-per-part", "1", "--workers", "2", "--no-progress"],
                            cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def records(out: str) -> int:
    folder = os.path.join(out, WORK)
    return sum(name.startswith("part-") and name.endswith(".json") for name in os.listdir(folder)) \
        if os.path.isdir(folder) else 0


def test_a_converter_killed_at_a_random_point_finishes_with_the_same_shards_and_no_duplicate_keys(tmp_path):
    src = make_xray_folder(str(tmp_path / "src"), 40)
    reference = str(tmp_path / "reference")
    convert("xray", src, reference, 2, sources_per_part=1, workers=1, progress=False)
    out = str(tmp_path / "out")
    seed = random.randrange(10**6)
    kill_after = random.Random(seed).randrange(1, 30)  # finished parts (of 40) before the SIGKILL
    converter = start_converter(src, out)
    deadline = time.time() + 120
    while records(out) < kill_after and converter.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(converter.pid, signal.SIGKILL)  # the converter and its worker processes, mid-part
    converter.wait()
    finished = records(out)
    assert converter.returncode == -signal.SIGKILL and finished < 40, (seed, converter.stdout.read())
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    rerun = run_pretrain(["shards", "xray", src, out, "--samples-per-shard", "2", "--sources-per-part", "1",
                          "--workers", "2", "--no-progress"])
    assert f"({finished} done earlier)" in rerun.stdout, (seed, rerun.stdout)
    assert output(out) == output(reference), seed
    assert len(keys(out)) == len(set(keys(out))) == 40


def test_a_rerun_over_new_files_converts_only_them(tmp_path):
    src = make_xray_folder(str(tmp_path / "src"), 8)
    out = str(tmp_path / "out")
    first = run_pretrain(["shards", "xray", src, out, "--samples-per-shard", "4", "--workers", "1", "--no-progress"])
    assert "2 part(s) converted (0 done earlier)" in first.stdout
    before = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name.endswith(".tar")}
    new = make_xray_folder(str(tmp_path / "new"), 3, seed=1)
    for index, name in enumerate(sorted(os.listdir(new))):  # names that sort between the old ones
        shutil.move(os.path.join(new, name), os.path.join(src, f"cxr_{index:03d}b.png"))
    second = run_pretrain(["shards", "xray", src, out, "--samples-per-shard", "4", "--workers", "2",
                           "--no-progress"])
    assert "1 part(s) converted (2 done earlier)" in second.stdout
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["total_samples"] == 11 and [s["samples"] for s in manifest["shards"]] == [4, 4, 3]
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in before} == before
    with tarfile.open(os.path.join(out, "xray-000002.tar")) as tar:
        names = {json.loads(tar.extractfile(m).read())["source"] for m in tar.getmembers() if m.name.endswith("json")}
    assert names == {"cxr_000b.png", "cxr_001b.png", "cxr_002b.png"}
    assert len(load_plan(out)["parts"]) == 3
