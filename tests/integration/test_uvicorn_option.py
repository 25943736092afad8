"""`http_server: uvicorn` also serves the whole round lifecycle (HTTP/1.1 devices)."""

import torch

from ares.core.messages import DeviceReport
from ares.core.models import build_model, split_model
from ares.runtime.link import HttpLink
from tests.support import small_config, token


def test_a_round_over_uvicorn(tmp_path, server_process):
    cfg = small_config(tmp_path, rounds=1).model_copy(update={"http_server": "uvicorn"})
    server = server_process(cfg)
    link = HttpLink(server.url, "dev-a", token(cfg, "dev-a"), http2=False)
    try:
        reply, weights, _ = link.join(0, 2)
        model = build_model("vgg5", seed=None)
        model.load_state_dict({**model.state_dict(), **weights})
        part, _ = split_model(model, 2)
        out = part(torch.randn(4, 3, 32, 32))
        result = link.step(0, 2, out.detach(), torch.randint(0, 10, (4,)))
        assert result.grad.shape == out.shape and result.server_s > 0
        link.upload(DeviceReport(round=0, split=2, samples=4), {f"layers.{k}": v for k, v in part.layers.state_dict().items()})
        status = link.status()
        assert status.phase == "finished" and status.accuracy is not None
        assert link.client.get("/healthz").http_version == "HTTP/1.1"
    finally:
        link.close()
