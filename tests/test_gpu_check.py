"""The GPU acceptance run's two halves that a CPU machine can check: the bundle's offline resolution for the
GPU machine's Python, and `make gpu-check` without a GPU (its plan, exit 0)."""
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_bundle
from benchmarks.gpu_checks import CHECKS
from tests.conftest import REPO


def test_requirements_are_met_by_the_bundle_or_the_preinstalled_packages_as_on_python_312(tmp_path):
    gpu_bundle.stand_in(str(tmp_path), "alpha", "1.0", requires=(
        "beta>=2", "torch>=2.10", "gamma; python_version < '3.12'", "delta; extra == 'docs'", "epsilon"))
    gpu_bundle.stand_in(str(tmp_path), "beta", "1.5")
    have = gpu_bundle.bundled(str(tmp_path))
    assert sorted(have) == ["alpha", "beta"]
    # torch comes from the machine (2.11); gamma and delta do not apply on 3.12 without extras
    assert gpu_bundle.unmet(have) == ["alpha: beta>=2 (1.5)", "alpha: epsilon (absent)"]
    if sys.version_info < (3, 12):  # pip judges markers by its own Python: a stand-in keeps its resolver going
        assert gpu_bundle.not_for_this_python(have) == ["gamma"]


def test_a_bundle_holding_a_preinstalled_package_or_missing_a_dependency_fails_the_check(tmp_path):
    gpu_bundle.stand_in(str(tmp_path), "torch", "2.11.0")
    problems = gpu_bundle.check(str(tmp_path))["problems"]
    assert any("holds packages the machine has" in p and "torch" in p for p in problems)
    assert any("pip could not resolve" in p for p in problems)  # the wanted packages are not in it


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole acceptance run")
def test_gpu_check_without_a_gpu_prints_its_plan_and_exits_0():
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "no CUDA device here: nothing run." in result.stdout
    assert all(name in result.stdout for name in CHECKS)
