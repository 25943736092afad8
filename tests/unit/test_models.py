"""Models split cleanly: published shapes, every split point, clear errors."""

import copy

import pytest
import torch

from ares.core.models import (SplitError, activation_numel, build_model, check_split, parameter_count,
                              split_model, weight_bytes)

PUBLISHED_BYTES = [131072, 32768, 65536, 16384, 16384, 512]


def test_vgg5_is_the_published_network():
    model = build_model("vgg5")
    assert len(model.layers) == 7
    assert parameter_count(model) == 582_346  # "about 582k"
    assert [4 * n for n in activation_numel("vgg5")[:6]] == PUBLISHED_BYTES
    assert activation_numel("vgg5")[6] == 10


def test_same_seed_same_weights_and_different_seed_differs():
    a, b, c = build_model("vgg5", seed=4), build_model("vgg5", seed=4), build_model("vgg5", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.layers["0"][0].weight, c.layers["0"][0].weight)


@pytest.mark.parametrize("name", ["vgg5", "resnet18"])
def test_every_split_is_transparent(name):
    """Split forward/backward equals whole forward/backward (torchgpipe's transparency test)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    base = build_model(name, seed=1).eval()
    whole = copy.deepcopy(base)
    ref_loss = torch.nn.functional.cross_entropy(whole(x), y)
    ref_loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in whole.named_parameters()}
    splits = range(len(whole.layers)) if name == "vgg5" else (0, 2, 4, 5)  # ResNet-18 is slow on 2 cores
    for s in splits:
        model = copy.deepcopy(base)
        device, server = split_model(model, s)
        act = device(x)
        sent = act.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(server(sent), y)
        loss.backward()
        act.backward(sent.grad)
        torch.testing.assert_close(loss, ref_loss)
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[k], msg=f"split {s}: {k}")


def test_parts_keep_whole_model_key_names():
    model = build_model("vgg5")
    device, server = split_model(model, 2)
    keys = {f"layers.{k}" for k in device.layers.state_dict()} | {f"layers.{k}" for k in server.layers.state_dict()}
    assert keys == set(model.state_dict())
    assert device.indices == [0, 1, 2] and server.indices == [3, 4, 5, 6]


@pytest.mark.parametrize("bad", [-1, 7, 100, True, 2.0])
def test_out_of_range_split_names_the_valid_range(bad):
    with pytest.raises(SplitError, match=r"0\.\.6"):
        check_split(bad, 7)


def test_unknown_model_lists_known_ones():
    with pytest.raises(SplitError, match="vgg5"):
        build_model("alexnet")


def test_weight_bytes_grow_with_the_split():
    wb = weight_bytes("vgg5")
    assert wb == sorted(wb) and len(wb) == 7
    assert wb[-1] == sum(t.numel() * t.element_size() for t in build_model("vgg5").state_dict().values())
