"""Frozen-feature probes during pretraining: weighted kNN and a linear probe on a labelled set.

The set may be of any modality the encoder takes: 2D images, CT (2.5D slabs for a 2D encoder,
centred 3D crops for a tubelet encoder) or video clips; each sample goes through its modality
preparer's deterministic evaluation path. Features are the mean of the encoder's patch (or tube)
tokens. The set is split once, by a hash of each key, into a bank (the kNN memory and the
linear probe's training set) and queries (where accuracy is measured). Feature extraction is sharded across ranks, each rank
running the same number of forward passes (ZeRO-3 gathers parameters collectively);
the probes themselves are cheap and run on every rank from the gathered features.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from data_pipeline.eval_sets import LabelledSet, load_labelled_set
from data_pipeline.masks import patch_labels
from data_pipeline.mixture import source_spec
from data_pipeline.modalities import build_preparer
from data_pipeline.stream import stable_seed
from pretrain import dist
from pretrain.config import ConfigError


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 k: int, temperature: float) -> float:
    """Cosine kNN with votes weighted by exp(similarity / T), as in DINO.

    Args:
        bank: [N, D] features, bank_labels: [N]; queries: [M, D], query_labels: [M].
    """
    classes = int(torch.cat([bank_labels, query_labels]).max()) + 1
    similarity = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    top, index = similarity.topk(min(k, bank.shape[0]), dim=1)
    votes = torch.zeros(queries.shape[0], classes)
    votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
    return float((votes.argmax(1) == query_labels).float().mean())


def fit_linear(train: torch.Tensor, train_labels: torch.Tensor, classes: int, steps: int,
               weight_decay: float = 1e-4):
    """Multinomial logistic regression (L-BFGS) on standardised ``train`` [N, D]; returns ``predict(x) -> [M]``."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train = (train - mean) / std
    weights = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train @ weights + bias, train_labels) + weight_decay * weights.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (((x - mean) / std) @ weights + bias).argmax(1)

    return predict


def linear_probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                          test_labels: torch.Tensor, steps: int, weight_decay: float = 1e-4) -> float:
    """Multinomial logistic regression (L-BFGS, standardised features); accuracy on the test set."""
    classes = int(torch.cat([train_labels, test_labels]).max()) + 1
    predict = fit_linear(train, train_labels, classes, steps, weight_decay)
    return float((predict(test) == test_labels).float().mean())


def mean_iou(pred: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """Mean over classes of |pred = c and target = c| / |pred = c or target = c|, over the classes either holds."""
    ious = []
    for c in range(classes):
        union = int(((pred == c) | (target == c)).sum())
        if union:
            ious.append(int(((pred == c) & (target == c)).sum()) / union)
    return sum(ious) / len(ious)


def dense_probe_miou(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                     query_labels: torch.Tensor, steps: int, max_patches: int, seed: int = 0) -> float:
    """A linear per-patch classifier on frozen patch features; mean IoU of its patch labels on the queries.

    Args:
        bank: [N, P, D] patch features, bank_labels: [N, P] patch classes; queries / query_labels likewise.
        max_patches: bank patches the classifier is fitted on (a fixed random subset where there are more).
    """
    classes = int(torch.cat([bank_labels.flatten(), query_labels.flatten()]).max()) + 1
    train, labels = bank.flatten(0, 1), bank_labels.flatten()
    if len(labels) > max_patches:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_patches]
        train, labels = train[keep], labels[keep]
    predict = fit_linear(train, labels, classes, steps)
    return mean_iou(predict(queries.flatten(0, 1)), query_labels.flatten(), classes)


def probe_source(data_cfg, modality: str):
    """The run's (first) source of ``modality``: the probe set is prepared with its transforms, CT and
    video settings, and goes through its stem.

    Raises:
        ConfigError: no source of the run has that modality.
    """
    for source in data_cfg.sources:
        if source.modality == modality:
            return source
    raise ConfigError(f"probe.modality={modality}: no source of this run has that modality "
                      f"({sorted({s.modality for s in data_cfg.sources})}), so no stem or preprocessing for it")


class Prober:
    """Loads the labelled set once and measures kNN and linear-probe accuracy of an encoder.

    Args:
        cfg: :class:`pretrain.config.ProbeConfig`; ``cfg.modality`` (default: ``data.modality``) picks
            the run's source of that modality, whose preparer and stem the probe set goes through.
        data_cfg: the run's :class:`pretrain.config.DataConfig`.
        spec: the objective's DataSpec (view kind, sizes, frames or depth).
        stems: ``model.stems`` (extra stems' channels by modality).

    Raises:
        ConfigError: the probe modality cannot feed this encoder.
    """

    def __init__(self, cfg, data_cfg, spec, stems: dict, seed: int):
        self.cfg = cfg
        modality = cfg.modality or data_cfg.modality
        source = probe_source(data_cfg, modality)
        self.stem = source.stem or None
        try:
            preparer = build_preparer(source, source_spec(spec, source, stems or {}))
        except ValueError as exc:
            raise ConfigError(f"probe.modality={modality}: {exc}") from None
        self.data: LabelledSet = load_labelled_set(cfg.shards, preparer, cfg.max_samples)
        cut = int(cfg.query_fraction * 1000)
        self.is_query = torch.tensor([stable_seed(seed, "probe", key) % 1000 < cut for key in self.data.keys])
        if self.is_query.all() or not self.is_query.any():
            raise ValueError(f"probe set of {len(self.data.keys)} samples gives an empty bank or query split")

    def features(self, encoder, device: torch.device, dtype: torch.dtype,
                 ranks: Optional[List[int]] = None) -> tuple:
        """Mean patch-token features [N, D] of the whole set, and (a set with masks; else None) its patch tokens
        [N, P, D], extracted across ``ranks`` (None: every rank; a student's group where several students train,
        each rank its own)."""
        ranks = list(range(dist.world_size())) if ranks is None else ranks
        rank, world = ranks.index(dist.rank()), len(ranks)
        indices = torch.arange(len(self.data.keys))[rank::world]
        per_rank = math.ceil(len(self.data.keys) / world)
        passes = math.ceil(per_rank / self.cfg.batch_size)
        mine = []
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            for step in range(passes):  # the same count on every rank: ZeRO-3 gathers collectively
                chunk = indices[step * self.cfg.batch_size:(step + 1) * self.cfg.batch_size]
                inputs = self.data.inputs[chunk if len(chunk) else torch.tensor([0])].to(device, dtype)
                tokens = encoder(inputs, stem=self.stem) if self.stem else encoder(inputs)
                patches = tokens[:, encoder.num_prefix_tokens:].float()
                kept = patches[: len(chunk)].cpu() if self.data.masks is not None else None
                mine.append((chunk, patches.mean(1).cpu()[: len(chunk)], kept))
        encoder.train(was_training)
        features, patches = torch.zeros(len(self.data.keys), encoder.embed_dim), None
        for index, parts in enumerate(dist.all_gather_object(mine)):
            for chunk, pooled, kept in (parts if index in ranks else ()):
                features[chunk] = pooled
                if kept is not None:
                    if patches is None:
                        patches = torch.zeros(len(self.data.keys), *kept.shape[1:])
                    patches[chunk] = kept
        return features, patches

    def measure(self, encoder, device: torch.device, dtype: torch.dtype, ranks: Optional[List[int]] = None) -> dict:
        """{'probe_knn_acc', 'probe_linear_acc'} (a set with class labels) and 'probe_dense_miou' (a set with
        masks) on the query split (features extracted across ``ranks``)."""
        features, patches = self.features(encoder, device, dtype, ranks)
        out = self.dense(encoder, patches) if patches is not None else {}
        labels, query = self.data.labels, self.is_query
        if (labels < 0).any():  # a segmentation set without class labels
            return out
        return {**out,
            "probe_knn_acc": knn_accuracy(features[~query], labels[~query], features[query], labels[query],
                                          self.cfg.k, self.cfg.temperature),
            "probe_linear_acc": linear_probe_accuracy(features[~query], labels[~query], features[query],
                                                      labels[query], self.cfg.linear_steps),
        }

    def dense(self, encoder, patches: torch.Tensor) -> dict:
        """{'probe_dense_miou'}: a linear classifier of the bank's patch features against their masks' patch
        classes, its mean IoU on the queries' patches (2D patches, or the tubelets of a volume's mask)."""
        masks, query = self.data.masks, self.is_query
        kernel = (encoder.tubelet, encoder.patch_size, encoder.patch_size) if masks.ndim == 4 else encoder.patch_size
        grid = [n // k for n, k in zip(masks.shape[1:], kernel if masks.ndim == 4 else (kernel, kernel))]
        if patches.shape[1] != math.prod(grid):
            raise ConfigError(f"dense probe: {patches.shape[1]} patch tokens are not the {' x '.join(map(str, grid))} "
                              f"grid of the {' x '.join(map(str, masks.shape[1:]))} masks")
        labels = patch_labels(masks, kernel, int(masks.max()) + 1).flatten(1)
        return {"probe_dense_miou": dense_probe_miou(patches[~query], labels[~query], patches[query], labels[query],
                                                     self.cfg.linear_steps, self.cfg.dense_patches)}
