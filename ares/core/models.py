"""Models declared as an ordered list of layers, and the one function that splits them.

A split point `s` (0..L-1) puts layers 0..s on the device and s+1..L-1 on the server; s = L-1
keeps everything on the device (plain federated learning). Both parts keep the whole model's
state-dict key names (`layers.<index>.…`), so device weights, server weights and the global
model line up without renaming, and FedAvg is a dict merge.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class SplitError(ValueError):
    """A split point or model description that cannot work; the message says what would."""


class LayerStack(nn.Module):
    """A contiguous run of a model's layers, keyed by their index in the whole model."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): m for i, m in sorted(layers.items())})

    @property
    def indices(self) -> list[int]:
        return [int(k) for k in self.layers.keys()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model: its ordered layers and its input."""

    name: str
    build_layers: Callable[[], list[nn.Module]]
    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _vgg5_layers() -> list[nn.Module]:
    layers: list[nn.Module] = [
        _conv_bn_relu(3, 32),
        nn.MaxPool2d(2),
        _conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        _conv_bn_relu(64, 64),
        nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 64, 128), nn.ReLU(inplace=True)),
        nn.Linear(128, 10),
    ]
    # The published initialisation (ARES/FedAdapt VGG): He for convs, N(0, 0.01) for dense layers.
    for module in nn.ModuleList(layers).modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return layers


def _resnet18_layers() -> list[nn.Module]:
    """torchvision's ResNet-18 cut at its block boundaries: stem, layer1..4, head."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=10)
    return [
        nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        net.layer1,
        net.layer2,
        net.layer3,
        net.layer4,
        nn.Sequential(net.avgpool, nn.Flatten(), net.fc),
    ]


MODELS: dict[str, ModelSpec] = {
    "vgg5": ModelSpec("vgg5", _vgg5_layers),
    "resnet18": ModelSpec("resnet18", _resnet18_layers),
}


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise SplitError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def build_model(name: str, seed: int | None = 0) -> LayerStack:
    """The whole model; the same seed gives the same initial weights on every process."""
    spec = model_spec(name)
    if seed is None:
        layers = spec.build_layers()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers = spec.build_layers()
    _verify_layers(layers)
    return LayerStack(dict(enumerate(layers)))


def _verify_layers(layers: list[nn.Module]) -> None:
    """Splitting needs each layer to own its parameters (as torchgpipe's verify_module insists)."""
    if not layers:
        raise SplitError("a model needs at least one layer")
    seen: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            if id(p) in seen and seen[id(p)] != i:
                raise SplitError(f"layers {seen[id(p)]} and {i} share a parameter; a split would duplicate it")
            seen[id(p)] = i


def n_layers(model: LayerStack) -> int:
    return len(model.layers)


def check_split(split: int, layers: int) -> int:
    if not isinstance(split, int) or isinstance(split, bool) or not 0 <= split < layers:
        raise SplitError(f"split point {split!r} is out of range: valid split points are 0..{layers - 1} "
                         f"({layers - 1} keeps every layer on the device)")
    return split


def split_model(model: LayerStack, split: int) -> tuple[LayerStack, LayerStack]:
    """Device part (layers 0..split) and server part (the rest); they share the model's modules."""
    modules = [model.layers[str(i)] for i in model.indices]
    check_split(split, len(modules))
    device = LayerStack({i: modules[i] for i in range(split + 1)})
    server = LayerStack({i: modules[i] for i in range(split + 1, len(modules))})
    return device, server


def part_keys(model: LayerStack, split: int, device_side: bool) -> list[str]:
    """State-dict keys of one side of a split, in the whole model's naming."""
    device, server = split_model(model, split)
    return [f"layers.{k}" for k in (device if device_side else server).layers.state_dict().keys()]


@functools.lru_cache(maxsize=None)
def activation_shapes(name: str) -> tuple[tuple[int, ...], ...]:
    """Per-sample output shape of every layer, found by running the model once (never hard-coded)."""
    spec = model_spec(name)
    model = build_model(name, seed=0).eval()
    shapes = []
    with torch.no_grad():
        x = torch.zeros((1, *spec.input_shape))
        for i in model.indices:
            x = model.layers[str(i)](x)
            shapes.append(tuple(x.shape[1:]))
    return tuple(shapes)


def activation_numel(name: str) -> list[int]:
    """Values per sample after each layer (the optimiser's transfer model uses these)."""
    return [int(torch.Size(s).numel()) for s in activation_shapes(name)]


@functools.lru_cache(maxsize=None)
def weight_bytes(name: str) -> list[int]:
    """Bytes of device-side parameters and buffers for each split (moved down and up every round)."""
    model = build_model(name, seed=0)
    per_layer = [sum(t.numel() * t.element_size() for t in model.layers[str(i)].state_dict().values())
                 for i in model.indices]
    out, total = [], 0
    for b in per_layer:
        total += b
        out.append(total)
    return out


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
