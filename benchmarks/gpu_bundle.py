"""`make gpu-bundle`: the wheels the GPU acceptance machine lacks, for its Python, in one git-ignored folder.

The machine lent for `make gpu-check` has one GPU, Python 3.12 with torch 2.11 (CUDA 13) and a few
libraries (:data:`PREINSTALLED`), no network, and takes at most 64 MiB of working tree. This script
writes ``gpu_bundle/``: the pinned versions of what the check needs that it lacks (:data:`WANTED`, at
the versions this .venv runs) and their dependencies, as wheels for CPython 3.12 on manylinux x86-64
(DeepSpeed ships an sdist: built here into a pure-Python wheel, its ops JIT-built there), plus
``MANIFEST.json`` (wheels, sizes, what was left out and why). ``--check`` verifies offline, with
pip's own resolver, that the bundle resolves for Python 3.12 beside stand-ins of the preinstalled
packages with nothing missing, and that it stays under :data:`LIMIT_MIB`.

    python benchmarks/gpu_bundle.py [--out gpu_bundle]          build
    python benchmarks/gpu_bundle.py --check [--out gpu_bundle]  resolve offline for Python 3.12
"""
from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MARKERS = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
LIMIT_MIB = 40
WANTED = ("deepspeed", "webdataset", "omegaconf", "xformers", "pydicom", "nibabel", "fsspec")
"""What `make gpu-check` imports that the machine lacks (pinned to this .venv's versions)."""
LEFT_OUT = {
    "av": "a 35 MB wheel that alone nearly fills the 40 MiB budget; video decoding runs on CPUs, and the "
          "check's VideoMAE run (the 3D tubelet path a clip takes) trains on CT volumes instead",
    "mlflow": "12.6 MB plus about 20 MB of dependencies (sqlalchemy, alembic, flask, pandas...); the check's "
              "runs track to a metrics file (tracking.backend=jsonl)",
}
PREINSTALLED = {
    "torch": "2.11.0", "numpy": "2.1.0", "pillow": "10.4.0", "scipy": "1.13.0", "pyyaml": "6.0.1",
    "tqdm": "4.66.0", "safetensors": "0.4.5", "timm": "1.0.9", "transformers": "5.0.0",
    "huggingface-hub": "1.0.0", "scikit-learn": "1.5.0", "scikit-image": "0.24.0", "pytest": "8.3.0",
    "filelock": "3.13.0", "jinja2": "3.1.4", "networkx": "3.3", "sympy": "1.13.3", "requests": "2.32.0",
}
"""What the GPU machine has (and pip must not touch), at versions no newer than it is likely to have."""


def pip(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=True, text=True, **kwargs)


def target_args() -> List[str]:
    """pip's options that pick wheels for CPython 3.12 on manylinux x86-64."""
    out = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp", "--abi", "cp312"]
    for platform in PLATFORMS:
        out += ["--platform", platform]
    return out


def requirements_of(wheel: str) -> List[Requirement]:
    """The Requires-Dist of ``wheel`` that apply on the target (Python 3.12, Linux x86-64, no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(MARKERS)]


def bundled(folder: str) -> Dict[str, str]:
    """{canonical name: wheel path} of the wheels in ``folder``."""
    wheels = [f for f in os.listdir(folder) if f.endswith(".whl")]
    return {canonicalize_name(parse_wheel_filename(f)[0]): os.path.join(folder, f) for f in wheels}


def build(out: str) -> dict:
    """Fill ``out`` with the wanted wheels and their dependencies' closure; write MANIFEST.json."""
    os.makedirs(out, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WANTED]
    deepspeed = next(p for p in pins if p.startswith("deepspeed=="))
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out, deepspeed,
        env=dict(os.environ, DS_BUILD_OPS="0"))
    pip("download", "--quiet", "--no-deps", "-d", out, *target_args(), *[p for p in pins if p != deepspeed])
    while True:  # the dependency closure, minus what the machine has
        have = bundled(out)
        missing = sorted({str(r) for wheel in have.values() for r in requirements_of(wheel)
                          if canonicalize_name(r.name) not in have and canonicalize_name(r.name) not in PREINSTALLED})
        if not missing:
            break
        for requirement in missing:
            pip("download", "--quiet", "--no-deps", "-d", out, *target_args(), requirement)
    return write_manifest(out)


def write_manifest(out: str) -> dict:
    wheels = {os.path.basename(path): os.path.getsize(path) for path in bundled(out).values()}
    manifest = {"python": PYTHON, "platforms": list(PLATFORMS), "wanted": list(WANTED), "wheels": wheels,
                "total_mib": round(sum(wheels.values()) / 2**20, 2), "limit_mib": LIMIT_MIB, "left_out": LEFT_OUT,
                "preinstalled_on_the_gpu_machine": PREINSTALLED}
    with open(os.path.join(out, "MANIFEST.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
    return manifest


def stand_in(folder: str, name: str, version: str, requires: tuple = ()) -> str:
    """An empty wheel named like a preinstalled package, for pip's resolver to count it as present."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    path = os.path.join(folder, f"{name.replace('-', '_')}-{version}-py3-none-any.whl")
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{dist_info}/METADATA", metadata)
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stand-in\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


def unmet(have: Dict[str, str]) -> List[str]:
    """Every requirement (markers evaluated for Python 3.12 on Linux x86-64) of a bundled wheel that neither
    a bundled wheel nor a preinstalled package satisfies, as 'wheel: requirement (what is there)'."""
    versions = {name: str(parse_wheel_filename(os.path.basename(path))[1]) for name, path in have.items()}
    versions.update({name: version for name, version in PREINSTALLED.items() if name not in versions})
    out = []
    for name, path in sorted(have.items()):
        for requirement in requirements_of(path):
            there = versions.get(canonicalize_name(requirement.name))
            if there is None or not requirement.specifier.contains(there, prereleases=True):
                out.append(f"{name}: {requirement} ({there or 'absent'})")
    return out


def not_for_this_python(have: Dict[str, str]) -> List[str]:
    """Requirements that do not apply on Python 3.12 but do on the Python running pip here: pip evaluates
    markers for its own interpreter, not for ``--python-version``, so its resolver needs stand-ins for them."""
    here = {**MARKERS, "python_version": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "python_full_version": ".".join(map(str, sys.version_info[:3]))}
    names = set()
    for path in have.values():
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = email.parser.Parser().parsestr(archive.read(name).decode()).get_all("Requires-Dist") or []
        for requirement in map(Requirement, lines):
            if requirement.marker and requirement.marker.evaluate(here) and not requirement.marker.evaluate(MARKERS):
                names.add(canonicalize_name(requirement.name))
    return sorted(names - set(have))


def check(out: str) -> dict:
    """Check the bundle offline for Python 3.12: every requirement met by the bundle or the preinstalled
    packages (markers and versions as on 3.12), none of those packages inside it, under the size limit,
    and pip's own resolver (with stand-ins for the preinstalled packages) resolving the wanted ones from it.
    Returns {"ok", "would_install", "total_mib", "problems"}."""
    have = bundled(out)
    problems = [f"unmet requirement {line}" for line in unmet(have)]
    inside = sorted(set(have) & set(PREINSTALLED))
    if inside:
        problems.append(f"the bundle holds packages the machine has (pip would replace them): {inside}")
    total = sum(os.path.getsize(path) for path in have.values()) / 2**20
    if total > LIMIT_MIB:
        problems.append(f"the bundle is {total:.1f} MiB, over {LIMIT_MIB} MiB")
    with tempfile.TemporaryDirectory() as stubs, tempfile.TemporaryDirectory() as target:
        for name, version in PREINSTALLED.items():
            stand_in(stubs, name, version)
        for name in not_for_this_python(have):
            stand_in(stubs, name, "9999")
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                                 "--no-index", "--find-links", out, "--find-links", stubs, "--target", target,
                                 *target_args(), *WANTED], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("Would install")]
    would = lines[0].split()[2:] if lines else []
    if result.returncode:
        problems.append("pip could not resolve the bundle for Python 3.12: "
                        + (result.stderr.strip().splitlines() or ["?"])[-1])
    return {"ok": not problems, "would_install": would, "total_mib": round(total, 2), "problems": problems}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_bundle")
    parser.add_argument("--check", action="store_true", help="resolve the bundle offline for Python 3.12")
    args = parser.parse_args(argv)
    if args.check:
        report = check(args.out)
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    manifest = build(args.out)
    print(f"{args.out}: {len(manifest['wheels'])} wheels, {manifest['total_mib']} MiB (limit {LIMIT_MIB} MiB)")
    report = check(args.out)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
