"""Data: shards are disjoint and complete; the synthetic set is learnable but not trivial."""

import pytest
import torch

from ares.core.config import DataConfig
from ares.core.data import load_data, make_synthetic, partition


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("shards", [1, 3, 8])
def test_shards_are_disjoint_and_cover_everything(scheme, shards):
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    parts = partition(labels, shards, scheme, beta=0.3, seed=1)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == 1000
    assert all(parts)
    assert parts == partition(labels, shards, scheme, beta=0.3, seed=1)  # every process cuts the same way


def test_dirichlet_skews_label_mix_and_iid_does_not():
    labels = torch.arange(10).repeat(200)

    def spread(parts):  # mean fraction of a shard taken by its most common label
        return sum(torch.bincount(labels[p], minlength=10).max().item() / len(p) for p in parts) / len(parts)

    assert spread(partition(labels, 5, "iid", seed=0)) < 0.15
    assert spread(partition(labels, 5, "dirichlet", beta=0.1, seed=0)) > 0.4


def test_unknown_partition_lists_accepted():
    with pytest.raises(ValueError, match="iid, dirichlet"):
        partition(torch.zeros(10, dtype=torch.long), 2, "zipf")


def test_synthetic_set_is_learnable_by_a_small_cnn():
    data = make_synthetic(1000, 300, seed=0)
    x, y = data.train.tensors
    xt, yt = data.test.tensors
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                              torch.nn.Flatten(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    chance = (net(xt).argmax(1) == yt).float().mean().item()
    for _ in range(4):
        for i in range(0, 1000, 50):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
    acc = (net(xt).argmax(1) == yt).float().mean().item()
    assert chance < 0.3 and acc > 0.9


def test_auto_falls_back_to_synthetic_and_says_why(tmp_path):
    split = load_data(DataConfig(name="auto", path=str(tmp_path), synthetic_train=50, synthetic_test=20))
    assert split.source == "synthetic" and "CIFAR-10 not found" in split.note and len(split.train) == 50


def test_default_synthetic_set_is_the_harder_one_and_the_easy_one_stays_by_name():
    hard = load_data(DataConfig(name="synthetic", synthetic_train=40, synthetic_test=10))
    easy = load_data(DataConfig(name="synthetic-easy", synthetic_train=40, synthetic_test=10))
    assert hard.source == easy.source == "synthetic"
    assert not torch.equal(hard.train.tensors[0], easy.train.tensors[0])
    ref = make_synthetic(40, 10, seed=0)
    assert torch.equal(easy.train.tensors[0], ref.train.tensors[0])  # unchanged, for tests that rely on it
    auto = load_data(DataConfig(name="auto", path="/nonexistent", synthetic_train=40, synthetic_test=10))
    assert torch.equal(auto.train.tensors[0], hard.train.tensors[0])  # the offline fallback is the harder set


def test_hard_set_labels_a_fifth_of_its_samples_at_random(monkeypatch):
    """The ceiling that keeps it from saturating: 20% of labels drawn at random, so about 18%
    disagree with the pattern the sample was drawn from (the rest of the draws are unchanged)."""
    import ares.core.data as data

    noisy = data.make_synthetic_hard(5000, 10, seed=3)
    monkeypatch.setattr(data, "HARD_LABEL_NOISE", 0.0)
    clean = data.make_synthetic_hard(5000, 10, seed=3)
    assert torch.equal(noisy.train.tensors[0], clean.train.tensors[0])
    wrong = (noisy.labels != clean.labels).float().mean().item()
    assert 0.16 < wrong < 0.20


def test_a_server_keeps_the_labels_and_the_test_set_never_the_training_images(tmp_path):
    """The devices hold the training images; a server counts each device's share from the labels
    and evaluates on the test set; a shard of a sharded job evaluates nothing."""
    from ares.core.data import server_part
    from ares.runtime.training import TrainingServer, read_tokens
    from tests.support import small_config

    cfg = small_config(tmp_path, devices=("dev-a", "dev-b"))
    whole = load_data(cfg.data)
    kept = server_part(whole)
    assert len(kept.train) == 0 and len(whole.train) == cfg.data.synthetic_train
    assert torch.equal(kept.labels, whole.labels) and kept.test is whole.test
    assert len(server_part(whole, test=False).test) == 0
    server = TrainingServer(cfg, *read_tokens(cfg), profile=False)
    assert len(server.data.train) == 0 and len(server.data.test) == cfg.data.synthetic_test
    assert server._assigned_samples() == {"dev-a": 100, "dev-b": 100}  # the 200 training samples, shared
