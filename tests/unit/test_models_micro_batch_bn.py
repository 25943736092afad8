"""What micro-batching changes in the update: only BatchNorm, which normalises each micro-batch
with its own statistics. Measured here on VGG5 (three BatchNorm layers) and on the same model
with BatchNorm using fixed statistics, where the accumulated update equals the full batch's."""

from __future__ import annotations

import torch

from ares.core.data import make_synthetic_hard
from ares.core.models import build_model


def _grads(model, x, y, k: int) -> torch.Tensor:
    model.zero_grad()
    for xi, yi in zip(torch.tensor_split(x, k), torch.tensor_split(y, k)):
        (torch.nn.functional.cross_entropy(model(xi), yi) * (len(yi) / len(y))).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_micro_batches_change_only_batchnorm():
    x, y = make_synthetic_hard(100, 10, seed=4).train.tensors
    model = build_model("vgg5", seed=0).train()
    full = _grads(model, x, y, 1)
    with_bn = {k: _rel(_grads(model, x, y, k), full) for k in (2, 4, 8)}
    for m in model.modules():  # BatchNorm with fixed (running) statistics: no per-batch effect
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    full_fixed = _grads(model, x, y, 1)
    without_bn = {k: _rel(_grads(model, x, y, k), full_fixed) for k in (2, 4, 8)}
    print(f"gradient vs full batch, BatchNorm per micro-batch: {with_bn}; with fixed statistics: {without_bn}")
    assert all(v < 1e-5 for v in without_bn.values())
    assert all(v > 1e-3 for v in with_bn.values())  # a real, measured difference...
    assert with_bn[2] < with_bn[8] < 0.5             # ...growing with k, and not a different direction
