"""The running mean (uploads folded one at a time, none kept) against the merge of every upload at
once, on random models: the same model to float rounding, split over shards or not; the methods
that do not decompose keep buffering; a training server folds each upload at once."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from ares.core.fedavg import STREAMING, Buffered, RunningMean, aggregate, merger, update_norm

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "bn.running_mean": (8,), "bn.num_batches_tracked": (),
          "fc.weight": (10, 32)}


def random_state(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: torch.randint(0, 1000, s, generator=gen) if k.endswith("tracked")
            else scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def fleet(seed: int, n: int, spread: float = 0.05):
    """A global model, n uploads near it (some far: norm_clip has something to clip) and their weights."""
    gen = torch.Generator().manual_seed(seed)
    reference = random_state(gen)
    states = []
    for i in range(n):
        delta = random_state(gen, spread * (40 if i % 5 == 0 else 1))
        states.append({k: v + delta[k] if v.is_floating_point() else delta[k] for k, v in reference.items()})
    weights = torch.randint(1, 500, (n,), generator=gen).tolist()
    return reference, states, weights


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        if want[k].is_floating_point():
            torch.testing.assert_close(got[k], want[k], rtol=rel, atol=rel * float(want[k].abs().max()), msg=k)
        else:
            assert torch.equal(got[k], want[k]), k


def by_hand(states, weights) -> dict[str, torch.Tensor]:
    """The weighted mean in numpy float64 over the whole stack (another computation altogether)."""
    out = {}
    for k in states[0]:
        stack = np.stack([s[k].numpy() for s in states])
        if states[0][k].is_floating_point():
            out[k] = torch.from_numpy(np.asarray(np.average(stack.astype(np.float64), axis=0, weights=weights))).to(
                states[0][k].dtype)
        else:
            out[k] = torch.from_numpy(np.asarray(stack.max(axis=0)))
    return out


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 7), (2, 40)], ids=["one", "seven", "forty"])
def test_running_mean_equals_the_weighted_mean_of_every_upload(seed, n):
    reference, states, weights = fleet(seed, n)
    running = merger("fedavg", reference)
    for s, w in zip(states, weights):
        running.add(s, w)
    assert isinstance(running, RunningMean) and running.count == n and running.weight == sum(weights)
    assert_close(running.result(), by_hand(states, weights))
    assert_close(running.result(), aggregate("fedavg", states, weights, reference))


@pytest.mark.parametrize("seed", [3, 4])
def test_norm_clip_streams_each_update_clipped_against_the_global_model(seed):
    reference, states, weights = fleet(seed, 12)
    clip = 1.0
    assert max(update_norm(s, reference) for s in states) > 5 * clip  # some updates are clipped
    running = merger("norm_clip", reference, clip_norm=clip)
    for s, w in zip(states, weights):
        running.add(s, w)
    want = aggregate("norm_clip", states, weights, reference, clip_norm=clip)
    assert_close(running.result(), want)
    assert_close(running.result(), by_hand([_clipped(s, reference, clip) for s in states], weights))
    assert not _same(running.result(), aggregate("fedavg", states, weights, reference))


def _clipped(state, reference, clip):
    norm = update_norm(state, reference)
    scale = min(1.0, clip / norm)
    return {k: (ref.double() + (state[k].double() - ref.double()) * scale).float() if ref.is_floating_point()
            else state[k] for k, ref in reference.items()}


def _same(a, b) -> bool:
    return all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-6) for k in a)


@pytest.mark.parametrize("method", STREAMING)
@pytest.mark.parametrize("shards", [2, 3, 5])
def test_partial_sums_of_shards_merge_to_the_same_model(method, shards):
    reference, states, weights = fleet(10 + shards, 23)
    parts = [merger(method, reference, clip_norm=1.0) for _ in range(shards)]
    for i, (s, w) in enumerate(zip(states, weights)):
        parts[(i * 7) % shards].add(s, w)  # any split of the uploads over the shards
    root = merger(method, reference, clip_norm=1.0)
    for part in parts:
        root.add_sum(part.sums, part.maxes, part.weight, part.count)
    assert root.count == len(states) and root.weight == sum(weights)
    assert_close(root.result(), aggregate(method, states, weights, reference, clip_norm=1.0))


def test_a_shard_without_uploads_adds_nothing():
    reference, states, weights = fleet(20, 3)
    root, empty = RunningMean(reference), RunningMean(reference)
    root.add(states[0], weights[0])
    root.add_sum(empty.sums, empty.maxes, empty.weight, empty.count)
    assert_close(root.result(), aggregate("fedavg", states[:1], weights[:1], reference))


def test_the_running_mean_keeps_no_upload():
    reference, states, weights = fleet(5, 3)
    running = RunningMean(reference)
    upload = {k: v.clone() for k, v in states[0].items()}
    gone = weakref.ref(upload["fc.weight"])
    running.add(upload, weights[0])
    del upload
    gc.collect()
    assert gone() is None
    # its memory is the model's, in float64, whatever the number of uploads
    held = sum(t.numel() * t.element_size() for t in (*running.sums.values(), *running.maxes.values()))
    for s, w in zip(states[1:], weights[1:]):
        running.add(s, w)
    assert held == sum(t.numel() * t.element_size() for t in (*running.sums.values(), *running.maxes.values()))


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_methods_that_need_every_upload_keep_buffering(method):
    reference, states, weights = fleet(6, 9)
    merge = merger(method, reference, trim_fraction=0.2)
    for s, w in zip(states, weights):
        merge.add(s, w)
    assert isinstance(merge, Buffered) and merge.count == 9
    want = aggregate(method, states, weights, reference, trim_fraction=0.2)
    assert all(torch.equal(merge.result()[k], want[k]) for k in want)


def test_bad_states_and_weights_are_refused():
    reference, states, _ = fleet(7, 1)
    running = RunningMean(reference)
    with pytest.raises(ValueError, match="different keys"):
        running.add({k: v for k, v in states[0].items() if k != "conv.bias"}, 1)
    with pytest.raises(ValueError, match="shape"):
        running.add({**states[0], "conv.bias": torch.zeros(9)}, 1)
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            running.add(states[0], weight)
    with pytest.raises(ValueError, match="at least one"):
        running.result()
    with pytest.raises(ValueError, match="unknown aggregation"):
        merger("krum", reference)


def test_a_training_server_folds_each_upload_at_once(tmp_path):
    """Through the server: an accepted upload is in the round's running sum and not in its slot,
    and the closed round's model is the weighted mean of the two uploads."""
    from ares.runtime.training import TrainingServer, read_tokens
    from tests.support import small_config

    cfg = small_config(tmp_path, devices=("dev-a", "dev-b"), rounds=2, batch_size=20)
    server = TrainingServer(cfg, *read_tokens(cfg), profile=False)
    start = server.global_state()
    uploads = {}
    for i, name in enumerate(cfg.devices):
        server.join(name, 0, 6)
        uploads[name] = {k: v + 0.01 * (i + 1) if v.is_floating_point() else v.clone()
                         for k, v in server.expected_weights(6).items()}
    from ares.core.messages import DeviceReport

    server.upload("dev-a", DeviceReport(round=0, split=6, samples=30), uploads["dev-a"])
    assert server.slots["dev-a"].uploaded is True and server._merge.count == 1 and server._merge.weight == 30
    assert not any(isinstance(v, dict) for v in vars(server.slots["dev-a"]).values())
    server.upload("dev-b", DeviceReport(round=0, split=6, samples=10), uploads["dev-b"])
    assert server.round == 1
    want = aggregate("fedavg", list(uploads.values()), [30, 10], start)
    assert_close(server.global_state(), {k: want[k] for k in server.global_state()}, rel=1e-6)
