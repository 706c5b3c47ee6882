"""The loader's cost per GPU in `pretrain plan`: samples/s a GPU needs at an MFU, the cores that takes at a
per-core rate (from a rates file or measured on the recipe's shards), the cores a task leaves, the warning."""
import json
import os

import pytest

from data_pipeline.writers import WRITERS
from launch.profiles import load_profile
from pretrain.config import load_config
from pretrain.plan import build_plan, format_plan
from pretrain.plan_loader import LEVERS, RATES, LoaderOptions, check_mfu, load_rates, mixture_rate
from tests.conftest import REPO, make_xray_folder, run_pretrain

RECIPE = os.path.join(REPO, "pretrain", "configs", "mae_vit_xray.yaml")
PROFILE = os.path.join(REPO, "clusters", "node_8x80gb.yaml")
KEY = "xray/single/224"


def mae_vit_b_flops_per_sample() -> float:
    """Training FLOPs of one mae_vit_xray sample, written out: forward of a block = 2 x tokens x (4 w^2 + 2 w x 4w)
    matmul FLOPs + 4 x tokens^2 x w attention; training = 3 x forward. Encoder: 12 blocks of 768 on the cls token
    and 10% of 196 patches (19); decoder: 8 blocks of 512 on 197 tokens."""
    def block(tokens, width):
        return 2 * tokens * 12 * width * width + 4 * tokens * tokens * width
    return 3 * (12 * block(20, 768) + 8 * block(197, 512))


def write_rates(path, rates: dict) -> str:
    with open(path, "w") as handle:
        json.dump({"rates": {key: {"samples_per_s_per_core": rate, "machine": "a test CPU", "data": "made up"}
                             for key, rate in rates.items()}}, handle)
    return str(path)


def profile_copy(tmp_path, cpus: int) -> str:
    text = open(PROFILE).read().replace("cpus_per_task: 12", f"cpus_per_task: {cpus}")
    assert f"cpus_per_task: {cpus}" in text
    path = tmp_path / f"node_{cpus}cpus.yaml"
    path.write_text(text)
    return str(path)


def plan_of(profile: str, options: LoaderOptions, overrides=()) -> dict:
    return build_plan(load_config(RECIPE, list(overrides)), load_profile(profile), deepspeed_estimates=False,
                      loader=options)


def test_plan_prints_samples_and_cores_per_gpu_for_mae_xray_on_8x80gb(tmp_path):
    rates = write_rates(tmp_path / "rates.json", {KEY: 1000.0})
    out = run_pretrain(["plan", "--config", RECIPE, "--cluster", PROFILE, "--loader-rates", rates,
                        "--json", str(tmp_path / "plan.json")])
    loader = json.load(open(tmp_path / "plan.json"))["loader"]
    needed = 0.4 * 989e12 / mae_vit_b_flops_per_sample()
    assert loader["needed_samples_per_s"] == pytest.approx(needed, rel=1e-9)
    assert loader["cores_needed"] == pytest.approx(needed / 1000.0, rel=1e-9)
    assert loader["cores_available"] == 12 - 1 and loader["enough"]  # 9.4 cores needed, 11 left
    assert f"{needed:.0f} samples/s per GPU needed" in out.stdout
    assert f"CPU cores per GPU: {needed / 1000:.1f} needed, 11 available" in out.stdout
    assert "1000.0 samples/s, from" in out.stdout and "rates.json" in out.stdout and "a test CPU" in out.stdout
    assert "WARNING: the loader" not in out.stdout


def test_too_few_cpus_per_task_warns_and_names_the_levers(tmp_path):
    rates = write_rates(tmp_path / "rates.json", {KEY: 1000.0})
    plan = plan_of(profile_copy(tmp_path, 4), LoaderOptions(rates=rates))
    assert plan["loader"]["cores_available"] == 3 and plan["loader"]["enough"] is False
    text = format_plan(plan)
    warning = [line for line in text.splitlines() if "WARNING: the loader needs" in line]
    assert len(warning) == 1 and "3 available" in warning[0]
    for lever in ("--max-side", "crops", "data.decode_device=cuda", "cpus_per_task"):
        assert lever in warning[0]
    assert all(lever in warning[0] for lever in LEVERS)
    enough = plan_of(profile_copy(tmp_path, 64), LoaderOptions(rates=rates))
    assert enough["loader"]["enough"] and "WARNING" not in format_plan(enough)


def test_submitting_a_run_whose_loader_is_short_of_cores_warns(tmp_path):
    from launch.submit import submit

    result = submit(PROFILE, RECIPE, [f"output_dir={tmp_path}"], [], dry_run=True)  # the committed rates
    short = [line for line in result["warnings"] if "the loader needs" in line]
    assert len(short) == 1 and short[0].startswith("mae_vit_xray:") and "the profile gives 11" in short[0]


def test_a_lower_mfu_needs_proportionally_fewer_samples(tmp_path):
    rates = write_rates(tmp_path / "rates.json", {KEY: 1000.0})
    default, low = (plan_of(PROFILE, LoaderOptions(mfu=mfu, rates=rates))["loader"] for mfu in (0.4, 0.1))
    assert low["needed_samples_per_s"] == pytest.approx(default["needed_samples_per_s"] / 4)
    assert "loader at MFU 0.1:" in format_plan(plan_of(PROFILE, LoaderOptions(mfu=0.1, rates=rates)))


@pytest.mark.parametrize("mfu", [0.0, -0.2, 1.5])
def test_mfu_outside_zero_to_one_is_refused(mfu):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_mfu(mfu)


def test_the_command_refuses_a_bad_mfu_with_a_clear_error():
    out = run_pretrain(["plan", "--config", RECIPE, "--cluster", PROFILE, "--mfu", "1.2"], check=False)
    assert out.returncode == 2 and "--mfu 1.2" in out.stderr and "(0, 1]" in out.stderr


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("loader_rate")
    src = make_xray_folder(str(root / "raw"), 8)
    WRITERS["xray"](src, str(root / "shards"), samples_per_shard=4, progress=False)
    return str(root / "shards")


def test_without_a_rate_for_the_case_the_plan_measures_the_recipes_shards(tmp_path, tiny_shards):
    rates = write_rates(tmp_path / "rates.json", {"pathology/single/224": 50.0})  # nothing for X-rays
    overrides = [f"data.shards={tiny_shards}"]
    plan = plan_of(PROFILE, LoaderOptions(rates=rates, measure="auto", seconds=0.5), overrides)
    loader = plan["loader"]
    assert loader["per_core_samples_per_s"] > 0
    assert loader["rate_source"].startswith(f"measured here (no rate for {KEY} in")
    assert tiny_shards in loader["rate_source"]
    assert loader["cores_needed"] == pytest.approx(loader["needed_samples_per_s"] / loader["per_core_samples_per_s"])
    never = plan_of(PROFILE, LoaderOptions(rates=rates, measure="never"), overrides)["loader"]
    assert never["per_core_samples_per_s"] is None and never["enough"] is None
    assert "--measure-loader" in never["rate_source"] and "WARNING" not in format_plan(plan_of(
        PROFILE, LoaderOptions(rates=rates, measure="never"), overrides))


def test_measure_loader_measures_even_where_a_rate_is_known(tmp_path, tiny_shards):
    rates = write_rates(tmp_path / "rates.json", {KEY: 1000.0})
    loader = plan_of(PROFILE, LoaderOptions(rates=rates, measure="always", seconds=0.5),
                     [f"data.shards={tiny_shards}"])["loader"]
    assert loader["rate_source"].startswith("measured here (--measure-loader)")
    assert loader["per_core_samples_per_s"] != 1000.0


def test_shards_that_cannot_be_read_leave_the_rate_unknown_and_say_why(tmp_path):
    rates = write_rates(tmp_path / "rates.json", {})
    loader = plan_of(PROFILE, LoaderOptions(rates=rates, measure="auto"),
                     [f"data.shards={tmp_path / 'nowhere'}"])["loader"]
    assert loader["cores_needed"] is None and "measuring" in loader["rate_source"] and "failed" in loader["rate_source"]
    assert "unknown (" in format_plan(plan_of(PROFILE, LoaderOptions(rates=rates), [f"data.shards={tmp_path}"]))


def test_the_committed_rates_file_has_the_shipped_recipes_cases():
    path, rates = load_rates(None)
    assert path == RATES
    for key in (KEY, "xray/multicrop/224+8x98", "pathology/multicrop/224+8x96", "ct/volume/160x64",
                "video/clip/224x16"):
        assert rates[key]["samples_per_s_per_core"] > 0 and rates[key]["machine"]
    with pytest.raises(FileNotFoundError, match="--loader-rates"):
        load_rates("/no/such/rates.json")


def test_a_mixture_adds_its_sources_times_per_sample_by_weight():
    assert mixture_rate([100.0, 100.0], [1, 3]) == pytest.approx(100.0)
    assert mixture_rate([100.0, 25.0], [1, 1]) == pytest.approx(1 / (0.5 / 100 + 0.5 / 25))


def test_a_profile_without_a_peak_says_the_loader_estimate_is_not_available():
    plan = build_plan(load_config(RECIPE), load_profile(os.path.join(REPO, "clusters", "local.yaml")),
                      deepspeed_estimates=False)
    assert plan["loader"]["needed_samples_per_s"] is None
    assert "loader at MFU 0.4: n/a (the profile states no gpu_peak_tflops)" in format_plan(plan)
