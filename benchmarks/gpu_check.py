"""`make gpu-check`: every check only a GPU can make, in one run, into one JSON report.

On a machine with a CUDA device it installs what the machine lacks from ``gpu_bundle/`` (made here by
`make gpu-bundle`; ``pip install --no-index --find-links``, beside the machine's own torch), writes tiny
synthetic shards, then runs each check of :mod:`benchmarks.gpu_checks` in its own process with its
own timeout, so that one failing or hanging check costs only itself. The report,
``benchmarks/results/gpu_check.json`` (and ``$OUT/gpu_check.json`` where ``$OUT`` is set), is
rewritten after every check, so it survives a run cut short. Without a GPU it prints the plan
and exits 0.

    python benchmarks/gpu_check.py [--only NAME ...] [--budget-s 480]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.gpu_checks import CHECKS  # noqa: E402

BUNDLE = os.path.join(REPO, "gpu_bundle")
BUDGET_S = 450
"""The whole run's limit (installs included), under the 8 minutes one GPU session may spend on it."""
NEEDED = ("deepspeed", "webdataset", "omegaconf", "xformers", "pydicom", "nibabel", "fsspec")


def report_paths() -> list:
    paths = [os.path.join(REPO, "benchmarks", "results", "gpu_check.json")]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "gpu_check.json"))
    return paths


def write_report(report: dict) -> None:
    for path in report_paths():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as handle:
            json.dump(report, handle, indent=2, default=str)
        os.replace(path + ".tmp", path)


def install_bundle() -> dict:
    """pip install the missing packages from gpu_bundle/ (offline); the machine's torch stays as it is."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return {"installed": [], "seconds": 0.0}
    if not os.path.isdir(BUNDLE):
        return {"error": f"missing {missing} and no {BUNDLE} (run `make gpu-bundle` where a registry is reachable)"}
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", BUNDLE,
                             "--no-warn-script-location", *missing], capture_output=True, text=True, timeout=240)
    out = {"installed": missing, "seconds": round(time.time() - start, 1), "rc": result.returncode}
    if result.returncode:
        out["error"] = result.stderr[-2000:]
    return out


def run_check(name: str, work: str, timeout: float) -> dict:
    """One check in its own process; its result from the JSON file it writes, or why there is none."""
    result_path = os.path.join(work, "results", f"{name}.json")
    os.makedirs(os.path.dirname(result_path), exist_ok=True)
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_checks", name, work, result_path], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as expired:
        rc, tail = "timeout", str(expired.stderr or "")[-3000:]
    result = {"seconds": round(time.time() - start, 1)}
    if os.path.isfile(result_path):
        with open(result_path) as handle:
            result.update(json.load(handle))
    else:
        result.update(ok=False, error=f"no result (exit {rc})")
    if not result.get("ok"):
        result["log_tail"] = tail
    return result


def plan_text() -> str:
    lines = ["make gpu-check would run, on one CUDA GPU (each check in its own process and timeout):"]
    lines += [f"  {name:<18} {seconds:>4} s  {doc}" for name, (seconds, _, doc) in CHECKS.items()]
    lines.append(f"  within {BUDGET_S} s in all (each check's timeout is cut to what is left), after installing "
                 f"{', '.join(NEEDED)} from gpu_bundle/ where missing; report benchmarks/results/gpu_check.json "
                 "and $OUT/gpu_check.json")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these checks (and those they need)")
    parser.add_argument("--work", default=os.path.join(REPO, "runs", "gpu_check"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing run.\n" + plan_text())
        return 0
    started = time.time()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": {}}
    report["install"] = install_bundle()
    write_report(report)
    os.makedirs(args.work, exist_ok=True)
    for name, (seconds, _, _) in CHECKS.items():
        if args.only and name not in args.only:
            continue
        left = BUDGET_S - (time.time() - started)
        if left < 20:
            report["checks"][name] = {"ok": False, "seconds": 0, "error": f"not run: the {BUDGET_S} s budget is spent"}
            continue
        report["checks"][name] = run_check(name, args.work, min(seconds, left))
        report["elapsed_s"] = round(time.time() - started, 1)
        write_report(report)
        print(f"{name}: {'ok' if report['checks'][name].get('ok') else 'FAILED'} "
              f"({report['checks'][name]['seconds']} s)", flush=True)
    failed = [n for n, r in report["checks"].items() if not r.get("ok")]
    report["failed"] = failed
    write_report(report)
    print(f"report: {', '.join(report_paths())}; {len(failed)} failed: {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
