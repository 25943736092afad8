"""SGD with momentum, the optimiser every device and server replica trains with.

The update is torch's own: `torch.optim.sgd.sgd`, the function that `torch.optim.SGD.step`
calls, with the same arguments, so the numbers are the same (tests/unit/test_sgd.py). What this
class leaves out is `torch.optim.Optimizer`'s wrapping of its methods, which imports
torch's compiler stack (`torch._dynamo`) when a process makes its first optimiser: every process
that trains pays 1-2 s of CPU at its start and about 150 MB of resident memory (x86,
bench/sgd_start.py), on devices that have little of either, for a compiler ARES never uses.

It keeps what `torch.optim.SGD` keeps in its `state`: one momentum buffer per parameter, made
on the parameter's first step with a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.optim.sgd import sgd

Momentum = list[Optional[torch.Tensor]]


@dataclass
class MomentumSGD:
    """`torch.optim.SGD(params, lr=lr, momentum=momentum)`, without weight decay, dampening or Nesterov."""

    params: list[torch.Tensor]  # any iterable of parameters; kept as a list
    lr: float
    momentum: float
    buffers: Momentum = field(init=False)

    def __post_init__(self) -> None:
        self.params = list(self.params)
        self.buffers = [None] * len(self.params)

    def zero_grad(self) -> None:
        """Drops the gradients (`zero_grad(set_to_none=True)`)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient; the others keep their value and momentum."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        buffers = [self.buffers[i] for i in live]
        sgd([self.params[i] for i in live], [self.params[i].grad for i in live], buffers,
            weight_decay=0.0, momentum=self.momentum, lr=self.lr, dampening=0.0, nesterov=False, maximize=False)
        for i, buf in zip(live, buffers):
            self.buffers[i] = buf

    def snapshot(self) -> Momentum:
        """Copies of the momentum buffers, for `restore`."""
        return [None if b is None else b.clone() for b in self.buffers]

    def restore(self, saved: Momentum) -> None:
        """Puts back the momentum of a `snapshot`: a buffer made since is dropped again."""
        self.buffers = [None if b is None else b.clone() for b in saved]
