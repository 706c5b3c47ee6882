"""What the test suite needs from the machine beyond Python, set up before pytest starts.

`make test` runs ``python -m tests.system_deps`` before pytest. It installs the Debian packages of
the services the tests start or build against (SLURM and munge, chromium, libaio, g++) where it can
(as root, or with passwordless sudo), then builds DeepSpeed's ops the tests use into the torch
extensions cache, so that no test compiles an op or installs anything inside its own timeout.
Where a package cannot be installed it says so before the tests start, with the line that would
install it.

The tests ask through :func:`require` / :func:`require_op`: a missing service skips the test with
a reason that names it and its install line (in CI, where ``.ci/run`` must have installed it, it
fails the test instead), and this module, a pytest plugin loaded by ``tests/conftest.py``, lists
every test skipped for a missing service at the end of the pytest summary.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

SKIP_PREFIX = "missing service"


@dataclass(frozen=True)
class Service:
    """A system dependency of some tests: the Debian packages that bring it and how to see it is here."""

    name: str
    packages: tuple
    used_by: str
    binaries: tuple = ()
    """Programs that must be on PATH; ``a|b`` accepts either name."""
    files: tuple = ()
    """Files that must exist (headers a build needs)."""

    def missing(self, which: Callable = shutil.which, exists: Callable = os.path.exists) -> List[str]:
        """The programs and files of this service that are not on this machine."""
        gone = [b for b in self.binaries if not any(which(name) for name in b.split("|"))]
        return gone + [f for f in self.files if not exists(f)]


SERVICES = (
    Service("slurm", ("slurm-wlm", "munge"), "tests/test_slurm.py: a real controller and node daemon",
            binaries=("slurmctld", "slurmd", "munged", "sbatch", "scontrol")),
    Service("chromium", ("chromium",), "tests/test_tracking_server.py: a screenshot of the MLflow UI",
            binaries=("chromium|chromium-browser",)),
    Service("libaio", ("libaio-dev",), "DeepSpeed's async_io op (ZeRO-Infinity NVMe offload test)",
            files=("/usr/include/libaio.h",)),
    Service("g++", ("g++",), "torch.compile's inductor and DeepSpeed's op builds", binaries=("g++",)),
)
BY_NAME: Dict[str, Service] = {service.name: service for service in SERVICES}


@dataclass(frozen=True)
class Op:
    """A DeepSpeed op the tests use, JIT-built into the torch extensions cache before pytest starts."""

    name: str
    builder: str
    needs: tuple = field(default=())


OPS = (Op("async_io", "AsyncIOBuilder", needs=("libaio", "g++")),)
OP_BY_NAME = {op.name: op for op in OPS}


def sudo_works() -> bool:
    """True when ``sudo`` runs commands here without asking for a password."""
    if shutil.which("sudo") is None:
        return False
    return subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


def install_prefix(uid: Optional[int] = None, passwordless_sudo: Optional[Callable[[], bool]] = None):
    """The command prefix that installs system packages here: [] as root, ['sudo', '-n'] with
    passwordless sudo, None when this user cannot install them."""
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return []
    return ["sudo", "-n"] if (passwordless_sudo or sudo_works)() else None


def install_line(services: Sequence[Service], as_root: bool = False) -> str:
    """The shell line that installs ``services``' packages (with sudo unless ``as_root``)."""
    packages = sorted({p for service in services for p in service.packages})
    return ("" if as_root else "sudo ") + "apt-get install -y " + " ".join(packages)


def missing_services(services: Sequence[Service] = SERVICES, which=shutil.which, exists=os.path.exists) -> list:
    """The services among ``services`` that this machine lacks, each as (service, missing parts)."""
    return [(s, gone) for s in services if (gone := s.missing(which, exists))]


def skip_reason(service: Service, gone: Sequence[str]) -> str:
    """The skip reason of a test that needs ``service``, naming what is missing and its install line."""
    return f"{SKIP_PREFIX} {service.name} ({', '.join(gone)} not found); install: {install_line([service])}"


def report_missing(missing: list, prefix) -> str:
    """The message shown before the tests start when services are missing after set-up."""
    why = ("this user can neither install system packages (not root) nor run sudo without a password"
           if prefix is None else "their installation failed (see apt-get's output above)")
    lines = [f"{len(missing)} service(s) the tests start or build against are missing: {why}.",
             "The tests that need them are skipped and listed at the end of the pytest summary:"]
    lines += [f"  {s.name}: {', '.join(gone)} not found, needed by {s.used_by}; "
              f"install: {install_line([s])}" for s, gone in missing]
    lines.append(f"  all at once: {install_line([s for s, _ in missing])}")
    return "\n".join(lines)


def install(missing: list, prefix: List[str], run: Callable = subprocess.run) -> None:
    """apt-get update, then apt-get install of the ``missing`` services' packages, with ``prefix``."""
    packages = sorted({p for service, _ in missing for p in service.packages})
    print(f"installing the tests' system packages: {' '.join(packages)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run([*prefix, "apt-get", "update", "-qq"], check=True, env=env)
    run([*prefix, "apt-get", "install", "-y", "-qq", *packages], check=True, env=env, stdout=subprocess.DEVNULL)


def _builder(op: Op):
    from deepspeed.ops import op_builder

    return getattr(op_builder, op.builder)()


def op_library(op: Op) -> str:
    """Where the JIT build of ``op`` lands in the torch extensions cache."""
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.join(_get_build_directory(op.name, verbose=False), f"{op.name}.so")


def op_built(op: Op) -> bool:
    """True when ``op`` is in the torch extensions cache (loading it then compiles nothing)."""
    return os.path.isfile(op_library(op))


def build_ops(ops: Sequence[Op] = OPS) -> List[str]:
    """Build every op in ``ops`` whose system packages are here; return the names not buildable."""
    unbuildable = []
    for op in ops:
        if missing_services([BY_NAME[n] for n in op.needs]) or not _builder(op).is_compatible(verbose=False):
            unbuildable.append(op.name)
            continue
        # load() rebuilds a cached op whose sources or build flags changed (another .venv's DeepSpeed is
        # another include path), and only loads an up-to-date one: here, not inside a test's timeout
        print(f"DeepSpeed op {op.name}: building or loading {op_library(op)} (a build takes minutes on 2 cores)",
              flush=True)
        start = time.time()
        _builder(op).load(verbose=False)
        print(f"DeepSpeed op {op.name}: ready in {time.time() - start:.0f} s", flush=True)
    return unbuildable


def set_up(uid: Optional[int] = None, passwordless_sudo: Optional[Callable[[], bool]] = None,
           build: Callable[[], List[str]] = build_ops) -> int:
    """Install what is missing where this user can, report what is still missing, build the ops."""
    missing = missing_services()
    prefix = install_prefix(uid, passwordless_sudo) if missing else []
    if missing and prefix is not None:
        try:
            install(missing, prefix)
        except subprocess.CalledProcessError as error:
            print(f"installing system packages failed: {error}", file=sys.stderr)
        missing = missing_services()
    if missing:
        print(report_missing(missing, prefix), file=sys.stderr, flush=True)
    unbuilt = build()
    if unbuilt:
        print(f"DeepSpeed ops not built (their system packages are missing): {', '.join(unbuilt)}", file=sys.stderr)
    return 0


def fail_or_skip(reason: str) -> None:
    """Skip with ``reason``; in CI, where .ci/run installs everything, fail instead."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{reason} -- in CI `make test` must have installed it")
    pytest.skip(reason)


def require(name: str) -> None:
    """Skip (fail in CI) the calling test unless service ``name`` is on this machine."""
    service = BY_NAME[name]
    gone = service.missing()
    if gone:
        fail_or_skip(skip_reason(service, gone))


def require_op(name: str) -> None:
    """Skip (fail in CI) the calling test unless DeepSpeed op ``name`` is built: a test never builds one."""
    op = OP_BY_NAME[name]
    for service in op.needs:
        require(service)
    if not op_built(op):
        fail_or_skip(f"{SKIP_PREFIX} DeepSpeed op {name} (not built in {op_library(op)}); "
                     "install: make test (or python -m tests.system_deps) builds it before pytest starts")


def pytest_report_header(config) -> List[str]:
    """Say before the tests start which services are missing."""
    missing = missing_services()
    return [f"missing services (their tests skip): {', '.join(s.name for s, _ in missing)}"] if missing else []


def skipped_for_missing_service(reports) -> Dict[str, List[str]]:
    """{skip reason: [test ids]} for the skip reports whose reason names a missing service."""
    grouped: Dict[str, List[str]] = {}
    for report in reports:
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(SKIP_PREFIX):
            grouped.setdefault(reason, []).append(report.nodeid)
    return grouped


def pytest_terminal_summary(terminalreporter) -> None:
    """List every test skipped for a missing service, with the line that would install it."""
    grouped = skipped_for_missing_service(terminalreporter.stats.get("skipped", []))
    if not grouped:
        return
    terminalreporter.section("tests skipped for a missing service")
    for reason, tests in grouped.items():
        terminalreporter.write_line(reason)
        for test in sorted(tests):
            terminalreporter.write_line(f"    {test}")


if __name__ == "__main__":
    sys.exit(set_up())
