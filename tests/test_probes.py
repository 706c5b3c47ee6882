"""Probe math, labelled-set writing and reading."""

import pytest
import torch

from data_pipeline.errors import BadInputError
from data_pipeline.eval_sets import load_labelled_set
from data_pipeline.transforms_2d import EvalView
from data_pipeline.write_shards import write_xray_shards
from pretrain.config import TransformConfig
from pretrain.probes import knn_accuracy, linear_probe_accuracy
from tests.conftest import write_digits


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
    data = load_labelled_set(str(tmp_path / "shards"), EvalView(32, 1, TransformConfig()), max_samples=30)
    assert data.images.shape == (30, 1, 32, 32) and data.labels.tolist()[:5] == [0, 1, 2, 3, 4]


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

