"""The set-up before the tests: who can install the system packages, what a user without root is told,
and the pytest summary that lists every test skipped for a missing service with its install line."""
import os
import subprocess
import sys

from tests import system_deps
from tests.conftest import REPO

SLURM_LINE = "install: sudo apt-get install -y munge slurm-wlm"


def test_root_installs_directly_sudo_without_password_installs_through_it_anyone_else_cannot():
    assert system_deps.install_prefix(uid=0, passwordless_sudo=lambda: False) == []
    assert system_deps.install_prefix(uid=1000, passwordless_sudo=lambda: True) == ["sudo", "-n"]
    assert system_deps.install_prefix(uid=1000, passwordless_sudo=lambda: False) is None


def test_missing_parts_are_found_per_service():
    present = {"slurmctld", "slurmd", "sbatch", "scontrol", "chromium-browser"}
    missing = system_deps.missing_services(which=lambda name: name in present, exists=lambda path: False)
    assert [(s.name, gone) for s, gone in missing] == [("slurm", ["munged"]), ("libaio", ["/usr/include/libaio.h"]),
                                                       ("g++", ["g++"])]  # chromium-browser stands for chromium


def test_without_root_nothing_is_installed_and_each_missing_service_is_named_with_its_install_line(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no slurm, chromium, g++ -- and no apt-get to call by mistake
    assert system_deps.set_up(uid=1000, passwordless_sudo=lambda: False, build=lambda: []) == 0
    err = capsys.readouterr().err
    assert "not root" in err and "nor run sudo without a password" in err
    assert "slurm: slurmctld, slurmd, munged, sbatch, scontrol not found, needed by tests/test_slurm.py" in err
    assert SLURM_LINE in err and "chromium: chromium|chromium-browser not found" in err
    assert "install: sudo apt-get install -y g++" in err
    (together,) = [line for line in err.splitlines() if "all at once:" in line]
    assert together.split("all at once: ")[1].replace(" libaio-dev", "") == \
        "sudo apt-get install -y chromium g++ munge slurm-wlm"  # libaio-dev too where its header is missing


def test_root_installs_every_missing_package_in_one_apt_get_call():
    calls = []
    missing = [(system_deps.BY_NAME["slurm"], ["munged"]), (system_deps.BY_NAME["chromium"], ["chromium"])]
    system_deps.install(missing, [], run=lambda argv, **kwargs: calls.append(argv))
    assert calls == [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "munge", "slurm-wlm"]]


def run_inner_suite(tmp_path, ci: bool) -> str:
    """A small pytest run (its own process, PATH without the services) of tests that need SLURM or chromium."""
    (tmp_path / "test_inner.py").write_text(
        "from tests.system_deps import require\n\n"
        "def test_needs_slurm():\n    require('slurm')\n\n"
        "def test_needs_chromium():\n    require('chromium')\n\n"
        "def test_needs_nothing():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH=str(tmp_path), PYTHONPATH=REPO, **({"CI": "true"} if ci else {}))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.system_deps", "-p", "no:cacheprovider",
                             str(tmp_path / "test_inner.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    return result.stdout


def test_the_summary_lists_each_test_skipped_for_a_missing_service_with_its_install_line(tmp_path):
    out = run_inner_suite(tmp_path, ci=False)
    assert "missing services (their tests skip): slurm, chromium" in out  # said before the tests start
    assert "1 passed, 2 skipped" in out
    section = out.split("tests skipped for a missing service", 1)[1]
    assert f"missing service slurm (slurmctld, slurmd, munged, sbatch, scontrol not found); {SLURM_LINE}" in section
    assert "missing service chromium (chromium|chromium-browser not found); install: sudo apt-get install -y " \
           "chromium" in section
    assert "test_inner.py::test_needs_slurm" in section and "test_inner.py::test_needs_chromium" in section
    assert "test_needs_nothing" not in section


def test_in_ci_a_missing_service_fails_its_test(tmp_path):
    out = run_inner_suite(tmp_path, ci=True)
    assert "2 failed, 1 passed" in out and "in CI `make test` must have installed it" in out
