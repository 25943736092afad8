"""Data sets and how they are cut into disjoint per-device shards.

CIFAR-10 goes through torchvision's real loader with the published augmentation. Where it is
not on disk (and cannot be downloaded), `synthetic` is a CIFAR-shaped set that a small CNN can
really learn but not saturate: each class has two smooth colour patterns, each sample one of
them, shifted, flipped, scaled, over a class-independent background pattern and noise, and a
fifth of the labels are drawn at random (a ceiling of 82%). VGG5 FL: 72.7% after 10 rounds of
`ares run`'s defaults (3 devices, whole shards; in-process emulation), 34.0% after the 10
rounds of 5 steps per device of `ares bench paper5` (measured); so the accuracy cost of fp16,
8-bit activations or micro-batching can be seen. `synthetic-easy` is the earlier set (one pattern
per class; 99% after one round), kept for tests that check that training works at all. Every process builds the same set from the same seed, so shards
cut by index are disjoint without sending any data around.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ares.core.config import DataConfig

log = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
HARD_NOISE = 0.6            # the hard synthetic set's pixel noise,
HARD_AMPLITUDE = (0.8, 1.4)  # its class pattern's strength range,
HARD_BACKGROUNDS = 16        # how many class-independent backgrounds it draws from,
HARD_LABEL_NOISE = 0.2       # and the share of samples whose label is drawn at random (the ceiling:
                             # 0.8 + 0.2 / 10 = 82% test accuracy, so no variant can saturate it)


@dataclass(frozen=True)
class DataSplit:
    train: Dataset
    test: Dataset
    labels: torch.Tensor  # training labels, for partitioning
    source: str           # "cifar10" or "synthetic"
    note: str = ""


def _empty() -> Dataset:
    return TensorDataset(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long))


def server_part(split: DataSplit, test: bool = True) -> DataSplit:
    """What a server keeps of the data: the training labels (each device's share of the set is
    counted from them) and, where it evaluates, the test set; never the training images, which
    the devices hold (CIFAR-10's are 150 MB). A shard of a sharded job evaluates nothing (`test`
    False: the root does)."""
    return DataSplit(train=_empty(), test=split.test if test else _empty(), labels=split.labels,
                     source=split.source, note=split.note)


def cifar10_on_disk(path: str | Path) -> bool:
    return (Path(path) / "cifar-10-batches-py" / "data_batch_1").exists()


def load_cifar10(path: str | Path, download: bool = False) -> DataSplit:
    import torchvision
    from torchvision import transforms

    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    train = torchvision.datasets.CIFAR10(str(path), train=True, download=download, transform=train_tf)
    test = torchvision.datasets.CIFAR10(str(path), train=False, download=download, transform=test_tf)
    return DataSplit(train, test, torch.tensor(train.targets), "cifar10")


def make_synthetic(n_train: int, n_test: int, seed: int = 0, classes: int = 10,
                   noise: float = 0.6) -> DataSplit:
    """A learnable CIFAR-shaped set: class prototypes + random shift, contrast and noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn((classes, 3, 4, 4), generator=gen)
    prototypes = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (n,), generator=gen)
        scale = 0.7 + 0.6 * torch.rand((n, 1, 1, 1), generator=gen)
        shifts = torch.randint(-3, 4, (n, 2), generator=gen)
        x = prototypes[labels] * scale
        x = torch.stack([torch.roll(img, shifts=(int(dy), int(dx)), dims=(1, 2))
                         for img, (dy, dx) in zip(x, shifts)])
        x = x + noise * torch.randn(x.shape, generator=gen)
        return x.contiguous(), labels

    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    return DataSplit(TensorDataset(xtr, ytr), TensorDataset(xte, yte), ytr, "synthetic")


def make_synthetic_hard(n_train: int, n_test: int, seed: int = 0, classes: int = 10,
                        noise: float = HARD_NOISE) -> DataSplit:
    """The default offline set: two modes per class, faint, over distracting backgrounds."""
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    up = lambda t: torch.nn.functional.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    modes = up(torch.randn((classes * 2, 3, 4, 4), generator=gen))
    backgrounds = up(torch.randn((HARD_BACKGROUNDS, 3, 4, 4), generator=gen))

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (n,), generator=gen)
        mode = labels * 2 + torch.randint(0, 2, (n,), generator=gen)
        amp = HARD_AMPLITUDE[0] + (HARD_AMPLITUDE[1] - HARD_AMPLITUDE[0]) * torch.rand((n, 1, 1, 1), generator=gen)
        x = modes[mode] * amp + backgrounds[torch.randint(0, HARD_BACKGROUNDS, (n,), generator=gen)]
        shifts = torch.randint(-4, 5, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        x = torch.stack([torch.roll(img.flip(2) if f else img, shifts=(int(dy), int(dx)), dims=(1, 2))
                         for img, (dy, dx), f in zip(x, shifts, flips)])
        x = x + noise * torch.randn(x.shape, generator=gen)
        flip = torch.rand(n, generator=gen) < HARD_LABEL_NOISE
        labels = torch.where(flip, torch.randint(0, classes, (n,), generator=gen), labels)
        return x.contiguous(), labels

    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    return DataSplit(TensorDataset(xtr, ytr), TensorDataset(xte, yte), ytr, "synthetic")


def synthetic(cfg: DataConfig) -> DataSplit:
    if cfg.name == "synthetic-easy":
        return make_synthetic(cfg.synthetic_train, cfg.synthetic_test, cfg.seed)
    return make_synthetic_hard(cfg.synthetic_train, cfg.synthetic_test, cfg.seed)


def load_data(cfg: DataConfig, path_override: Optional[str] = None) -> DataSplit:
    """`auto` takes CIFAR-10 where it is on disk (or downloadable) and says plainly when it is not."""
    path = path_override or cfg.path
    if cfg.name in ("synthetic", "synthetic-easy"):
        return synthetic(cfg)
    if cfg.name == "cifar10" or cifar10_on_disk(path):
        return load_cifar10(path, download=cfg.download)
    if cfg.download:
        try:
            return load_cifar10(path, download=True)
        except Exception as exc:  # no network: fall through to synthetic, saying why
            reason = f"download failed ({exc.__class__.__name__}: {exc})"
    else:
        reason = "download disabled"
    note = (f"CIFAR-10 not found under {path} ({reason}); training on the synthetic CIFAR-shaped set "
            f"({cfg.synthetic_train} train / {cfg.synthetic_test} test samples)")
    log.warning(note)
    split = make_synthetic_hard(cfg.synthetic_train, cfg.synthetic_test, cfg.seed)
    return DataSplit(split.train, split.test, split.labels, split.source, note)


def partition(labels: torch.Tensor, shards: int, scheme: str = "iid", beta: float = 0.5,
              seed: int = 0) -> list[list[int]]:
    """Disjoint index lists, one per shard. Dirichlet(beta) gives each shard a skewed label mix."""
    if shards < 1:
        raise ValueError("need at least one shard")
    n = len(labels)
    gen = torch.Generator().manual_seed(seed + 7919)
    if scheme == "iid":
        perm = torch.randperm(n, generator=gen).tolist()
        return [sorted(perm[i::shards]) for i in range(shards)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition {scheme!r}; accepted: iid, dirichlet")
    out: list[list[int]] = [[] for _ in range(shards)]
    dirichlet = torch.distributions.Dirichlet(torch.full((shards,), float(beta)))
    torch.manual_seed(seed + 104729)  # Dirichlet sampling takes no generator
    for cls in torch.unique(labels).tolist():
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        cuts = (torch.cumsum(dirichlet.sample(), 0) * len(idx)).round().long().tolist()
        start = 0
        for shard, stop in enumerate(cuts):
            out[shard].extend(idx[start:stop])
            start = stop
    # Every device needs something to train on: move one sample into any empty shard.
    for shard in range(shards):
        if not out[shard]:
            donor = max(range(shards), key=lambda j: len(out[j]))
            out[shard].append(out[donor].pop())
    return [sorted(s) for s in out]


def shard(split: DataSplit, index: int, shards: int, scheme: str, beta: float, seed: int) -> Subset:
    parts = partition(split.labels, shards, scheme, beta, seed)
    if not 0 <= index < shards:
        raise ValueError(f"shard index {index} out of range 0..{shards - 1}")
    return Subset(split.train, parts[index])
