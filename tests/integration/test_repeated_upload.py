"""A device's second upload for a round, against a real `ares server` process over HTTP/2: the
same bytes again is answered as the first was and counted once; different ones are refused with
409 and the first stands. Either way the round's global model is the one a single upload gives,
and so it stays when the repeat comes after the round closed."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file  # the server's own checkpoint: safetensors holds no code

from ares.core import wire
from ares.core.fedavg import aggregate
from ares.core.messages import DeviceReport
from ares.runtime.tlsclient import transport
from tests.support import small_config, token, wait_for

LOCAL = 6  # VGG5's local split: the device holds every layer, the upload is the whole model
SAMPLES = {"dev-a": 40, "dev-b": 60}


def nudged(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The weights with a small, seeded change to every float tensor (a trained round's stand-in)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in weights.items()}


def upload(client: httpx.Client, cfg, name: str, weights: dict[str, torch.Tensor]) -> httpx.Response:
    meta = DeviceReport(round=0, split=LOCAL, samples=SAMPLES[name]).model_dump(mode="json")
    return client.post(f"/v1/devices/{name}/update", content=wire.encode(weights, meta),
                       headers={"Authorization": f"Bearer {token(cfg, name)}"})


def closed_model(cfg) -> dict[str, torch.Tensor]:
    """The global model the server checkpointed when round 0 closed."""
    state = Path(cfg.checkpoint_dir) / "state.json"
    wait_for(lambda: state.exists() and '"round": 1' in state.read_text(), 30, "round 0's checkpoint")
    return load_file(str(Path(cfg.checkpoint_dir) / "global.safetensors"))


def assert_same_model(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def differs(got: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(got[k].double(), other[k].double(), atol=1e-7) for k in other)


@pytest.mark.parametrize("repeat", ["same-bytes", "different-bytes"])
def test_a_repeated_upload_never_changes_the_average(tmp_path, server_process, repeat):
    cfg = small_config(tmp_path, devices=("dev-a", "dev-b"), rounds=2, batch_size=20)
    cfg = cfg.model_copy(update={"round_deadline_s": 3600})
    server = server_process(cfg)
    with httpx.Client(transport=transport(None, http1=False, http2=True), base_url=server.url, timeout=60) as c:
        for name in cfg.devices:
            r = c.post(f"/v1/devices/{name}/join", json={"round": 0, "split": LOCAL},
                       headers={"Authorization": f"Bearer {token(cfg, name)}"})
            assert r.status_code == 200 and r.http_version == "HTTP/2", r.text
        start = wire.decode(bytearray(r.content)).tensors  # the global model of round 0
        a, a_other, b = nudged(start, 1), nudged(start, 2), nudged(start, 3)
        second = a if repeat == "same-bytes" else a_other

        first = upload(c, cfg, "dev-a", a)
        assert first.status_code == 200 and first.json() == {"ok": True, "round": 0}, first.text
        again = upload(c, cfg, "dev-a", second)
        if repeat == "same-bytes":
            assert again.status_code == 200 and again.json() == {"ok": True, "round": 0, "repeat": True}, again.text
        else:
            assert again.status_code == 409 and "already uploaded other weights" in again.json()["error"], again.text
        status = c.get("/v1/status", headers={"Authorization": f"Bearer {token(cfg, 'dev-b')}"}).json()
        assert status["round"] == 0 and status["devices"]["dev-a"]["phase"] == "uploaded", status

        assert upload(c, cfg, "dev-b", b).status_code == 200  # the last device: the round closes
        merged = closed_model(cfg)
        # after the close, the repeat is answered as before and still changes nothing
        late = upload(c, cfg, "dev-a", second)
        assert late.status_code == (200 if repeat == "same-bytes" else 409), late.text
        assert_same_model(closed_model(cfg), merged)

    single = aggregate(cfg.aggregation.method, [a, b], [SAMPLES["dev-a"], SAMPLES["dev-b"]], start,
                       clip_norm=cfg.aggregation.clip_norm, trim_fraction=cfg.aggregation.trim_fraction)
    assert_same_model(merged, single)
    # what a repeat that was counted again, or that replaced the first, would have made
    doubled = aggregate("fedavg", [a, second, b], [SAMPLES["dev-a"], SAMPLES["dev-a"], SAMPLES["dev-b"]], start)
    replaced = aggregate("fedavg", [a_other, b], [SAMPLES["dev-a"], SAMPLES["dev-b"]], start)
    assert differs(merged, doubled) and differs(merged, replaced)
