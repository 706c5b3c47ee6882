"""Probe math, labelled-set writing and reading."""

import pytest
import torch

from data_pipeline.errors import BadInputError
from data_pipeline.eval_sets import load_labelled_set
from data_pipeline.modalities import build_preparer
from data_pipeline.writers import write_xray_shards
from pretrain.config import ConfigError, load_config
from pretrain.objectives import build_objective
from pretrain.probes import Prober, knn_accuracy, linear_probe_accuracy
from tests.conftest import write_digit_clips, write_digit_volumes, write_digits

RECIPES = {"video": "pretrain/configs/videomae_v2_tiny_video_cpu.yaml",
           "ct": "pretrain/configs/videomae_v2_tiny_ct_cpu.yaml"}


def clusters(n_per_class: int, classes: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 5
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=gen), labels


def test_knn_and_linear_probe_separate_clusters_and_fail_on_shuffled_labels():
    bank, bank_labels = clusters(30, 4, 16, seed=0)
    queries, query_labels = clusters(30, 4, 16, seed=0)
    queries = queries + 0.1
    assert knn_accuracy(bank, bank_labels, queries, query_labels, k=5, temperature=0.07) == 1.0
    assert linear_probe_accuracy(bank, bank_labels, queries, query_labels, steps=50) == 1.0
    shuffled = bank_labels[torch.randperm(len(bank_labels), generator=torch.Generator().manual_seed(1))]
    assert knn_accuracy(bank, shuffled, queries, query_labels, k=20, temperature=0.07) < 0.5


def test_labelled_shards_round_trip(tmp_path):
    labels = write_digits(str(tmp_path / "raw"), 40)
    manifest = write_xray_shards(str(tmp_path / "raw"), str(tmp_path / "shards"), 16, progress=False,
                                 labels=labels)
    assert manifest["total_samples"] == 40
    cfg = load_config(overrides=["model.img_size=32", "model.patch_size=8"])
    decoder = build_preparer(cfg.data.sources[0], build_objective(cfg).data_spec())
    data = load_labelled_set(str(tmp_path / "shards"), decoder, max_samples=30)
    assert data.inputs.shape == (30, 1, 32, 32) and data.labels.tolist()[:5] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("modality", ["video", "ct"])
def test_probes_measure_tubelet_encoders_above_chance_only_with_true_labels(modality, tmp_path):
    """Digits as clips (moving) and as volumes (extruded) through the decoders' evaluation path; the
    randomly initialised 3D encoder's features separate them, shuffled labels sit at chance."""
    from data_pipeline.writers import write_ct_shards
    from data_pipeline.writers import write_video_shards

    write_set, write_shards = ((write_digit_clips, write_video_shards) if modality == "video"
                               else (write_digit_volumes, write_ct_shards))
    scores = {}
    for shuffled in (False, True):
        raw, shards = tmp_path / f"raw{shuffled}", tmp_path / f"shards{shuffled}"
        labels = write_set(str(raw), 200, shuffle_labels=shuffled)
        write_shards(str(raw), str(shards), 100, progress=False, labels=labels)
        cfg = load_config(RECIPES[modality], [f"probe.shards={shards}", "probe.linear_steps=50"])
        torch.manual_seed(0)
        objective = build_objective(cfg)
        prober = Prober(cfg.probe, cfg.data, objective.data_spec(), cfg.model.stems, cfg.seed)
        assert prober.data.inputs.shape[1:] == (cfg.model.in_chans, cfg.model.frames, 32, 32)
        scores[shuffled] = prober.measure(objective.encoder(), torch.device("cpu"), torch.float32)
    assert scores[False]["probe_knn_acc"] > 0.3 and scores[False]["probe_linear_acc"] > 0.3, scores  # chance: 0.1
    assert scores[True]["probe_knn_acc"] < 0.25 and scores[True]["probe_linear_acc"] < 0.25, scores


def test_a_probe_modality_that_cannot_feed_the_encoder_is_a_config_error(tmp_path):
    cfg = load_config(RECIPES["video"], [f"probe.shards={tmp_path}", "probe.modality=xray"])
    with pytest.raises(ConfigError, match="probe.modality=xray"):
        Prober(cfg.probe, cfg.data, build_objective(cfg).data_spec(), cfg.model.stems, cfg.seed)


def test_unlabelled_files_are_skipped_and_bad_label_rows_named(tmp_path):
    labels = write_digits(str(tmp_path / "raw"), 5)
    rows = open(labels).read().splitlines()
    open(labels, "w").write("\n".join(rows[:-1]) + "\n")  # the last image has no label
    manifest = write_xray_shards(str(tmp_path / "raw"), str(tmp_path / "shards"), 16, progress=False,
                                 labels=labels)
    assert manifest["total_samples"] == 4 and "no label" in manifest["skipped"][0]["reason"]
    bad = tmp_path / "bad.csv"
    bad.write_text("digit_0000.png,seven\n")
    with pytest.raises(BadInputError, match=r"bad\.csv:1"):
        write_xray_shards(str(tmp_path / "raw"), str(tmp_path / "out2"), 16, progress=False, labels=str(bad))



def test_a_mixture_model_is_probed_through_the_stem_of_the_probe_modality(tmp_path):
    labels = write_digits(str(tmp_path / "raw"), 40)
    write_xray_shards(str(tmp_path / "raw"), str(tmp_path / "shards"), 40, progress=False, labels=labels)
    cfg = load_config("pretrain/configs/mae_mixture_cpu.yaml",
                      [f"probe.shards={tmp_path / 'shards'}", "probe.modality=pathology", "probe.linear_steps=5"])
    objective = build_objective(cfg)
    prober = Prober(cfg.probe, cfg.data, objective.data_spec(), cfg.model.stems, cfg.seed)
    assert prober.stem == "pathology" and prober.data.inputs.shape[1] == 3  # grey digits fill the RGB stem
    scores = prober.measure(objective.encoder(), torch.device("cpu"), torch.float32)
    assert 0.0 <= scores["probe_knn_acc"] <= 1.0
