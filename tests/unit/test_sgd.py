"""The optimiser devices and server replicas train with: torch's SGD update, without torch's
compiler stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ares.core.sgd import MomentumSGD

ROOT = Path(__file__).resolve().parents[2]


def two_layers() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def train(model: nn.Module, opt, steps: int, frozen_at: int) -> None:
    """`steps` steps; from `frozen_at` on, the first layer gets no gradient (its parameters must keep
    their value and their momentum, as torch.optim.SGD keeps them)."""
    gen = torch.Generator().manual_seed(5)
    for step in range(steps):
        opt.zero_grad() if isinstance(opt, MomentumSGD) else opt.zero_grad(set_to_none=True)
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        first = model[0](x)
        if step >= frozen_at:
            first = first.detach()
        nn.functional.cross_entropy(model[2](model[1](first)), y).backward()
        opt.step()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_it_updates_as_torch_optim_sgd_does(momentum):
    ours, theirs = two_layers(), two_layers()
    opt = MomentumSGD(ours.parameters(), lr=0.05, momentum=momentum)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum)
    train(ours, opt, steps=6, frozen_at=4)
    train(theirs, ref, steps=6, frozen_at=4)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    for p, buf in zip(theirs.parameters(), opt.buffers):
        want = ref.state[p].get("momentum_buffer") if p in ref.state else None
        assert (buf is None) == (want is None) and (buf is None or torch.equal(buf, want))
    assert (momentum == 0.0) == all(b is None for b in opt.buffers)


def test_a_parameter_without_a_gradient_is_left_alone():
    model = two_layers()
    opt = MomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients yet
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.buffers == [None] * 4


def test_restore_puts_back_the_momentum_of_a_snapshot():
    model = two_layers()
    opt = MomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, steps=2, frozen_at=1)  # the first layer's buffers exist, the second's too
    saved = opt.snapshot()
    train(model, opt, steps=3, frozen_at=5)
    assert not torch.equal(opt.buffers[3], saved[3])
    opt.restore(saved)
    assert all(torch.equal(a, b) for a, b in zip(opt.buffers, saved))
    opt.buffers[3].add_(1.0)  # the restored buffers are copies: the snapshot is not changed by training on
    assert not torch.equal(opt.buffers[3], saved[3])

    fresh = MomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    empty = fresh.snapshot()
    train(model, fresh, steps=1, frozen_at=5)
    fresh.restore(empty)  # a buffer made after the snapshot is dropped, as torch.optim.SGD's state entry would be
    assert fresh.buffers == [None] * 4


def test_a_process_that_trains_never_imports_torchs_compiler_stack(tmp_path):
    """A round of the server and a device, in one process: what a device pod and a server pod
    import. torch.optim.SGD's first step imports torch._dynamo (1-2 CPU-s, ~160 MB resident)."""
    probe = (
        "import sys, threading\n"
        "from pathlib import Path\n"
        "from ares.core.config import DeviceSettings\n"
        "from ares.runtime.device import DeviceTrainer\n"
        "from ares.runtime.inprocess import InProcessLink\n"
        "from ares.runtime.training import TrainingServer, read_tokens\n"
        "from tests.support import small_config\n"
        "tmp = Path(sys.argv[1])\n"
        "cfg = small_config(tmp, devices=('dev-a',), rounds=1)\n"
        "server = TrainingServer(cfg, *read_tokens(cfg), profile=True)\n"
        "(tmp / 'dev-a.split').write_text('2')\n"
        "DeviceTrainer(DeviceSettings(name='dev-a', server_url='in-process', token_file='-',\n"
        "                             split_file=str(tmp / 'dev-a.split')), InProcessLink(server, 'dev-a')).run()\n"
        "assert server.phase == 'finished', server.phase\n"
        "assert server.history[0].devices['dev-a'].steps > 0, server.history\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n")
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
