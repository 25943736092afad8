"""Splitting changes nothing: for every split point of VGG5, one training step through the real
HTTP/2 path (a server process, an httpx HTTP/2 client) leaves the same weights as one step of
the whole model in one process."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ares.core.data import make_synthetic
from ares.core.messages import DeviceReport
from ares.core.models import build_model, n_layers, split_model
from ares.runtime.link import HttpLink
from tests.support import small_config, token


def _batch(i: int, n: int = 20):
    data = make_synthetic(200, 10, seed=5)
    x, y = data.train.tensors
    return x[i * n:(i + 1) * n].clone(), y[i * n:(i + 1) * n].clone()


def test_every_split_matches_monolithic_step(tmp_path: Path, server_process):
    layers = n_layers(build_model("vgg5"))
    cfg = small_config(tmp_path, rounds=layers, batch_size=20, lr=0.05, momentum=0.9)
    server = server_process(cfg)
    link = HttpLink(server.url, "dev-a", token(cfg, "dev-a"))
    reference = build_model("vgg5", seed=cfg.training.seed).train()
    device_model = build_model("vgg5", seed=None).train()
    try:
        for split in range(layers):
            x, y = _batch(split)
            # the monolithic step (a fresh optimiser each round, as both sides of a split do)
            opt = torch.optim.SGD(reference.parameters(), lr=cfg.training.lr_for_round(split), momentum=0.9)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            opt.step()
            # the same step split at `split`, over HTTP/2
            reply, weights, _ = link.join(split, split)
            device_model.load_state_dict({**device_model.state_dict(), **weights})
            part, _ = split_model(device_model, split)
            dopt = torch.optim.SGD(part.parameters(), lr=reply.lr, momentum=reply.momentum)
            dopt.zero_grad()
            out = part(x)
            if split == layers - 1:
                torch.nn.functional.cross_entropy(out, y).backward()
            else:
                result = link.step(split, split, out.detach(), y)
                assert result.server_s > 0 and result.up_bytes > out.numel() * 4
                out.backward(result.grad)
            dopt.step()
            link.upload(DeviceReport(round=split, split=split, samples=len(y)),
                        {f"layers.{k}": v for k, v in part.layers.state_dict().items()})
            assert link.status().round == split + 1
            merged = load_file(str(Path(cfg.checkpoint_dir) / "global.safetensors"))
            for key, want in reference.state_dict().items():
                got = merged[key]
                if want.is_floating_point():
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"split {split}: {key}")
                else:
                    assert torch.equal(got, want), f"split {split}: {key}"
        assert link.client.get("/healthz").http_version == "HTTP/2"
    finally:
        link.close()
