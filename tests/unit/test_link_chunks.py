"""The request body's chunk size: frame-sized (1 MiB) on an uncapped link, small where a rate
cap paces it (ares.runtime.link)."""

from __future__ import annotations

import json

import pytest
import torch

from ares.core import wire
from ares.runtime import link as link_mod
from ares.runtime.link import UNPACED_CHUNK, HttpLink, RateLimit


class _Stop(Exception):
    pass


@pytest.mark.parametrize("cap,expected", [(None, UNPACED_CHUNK), (625_000, wire.CHUNK)])
def test_chunk_size_follows_the_uplink_cap(tmp_path, monkeypatch, cap, expected):
    seen = []
    real = wire.encode_chunks

    def spy(tensors, meta=None, chunk=wire.CHUNK):
        seen.append(chunk)
        total, chunks = real(tensors, meta, chunk)
        assert max(len(c) for c in chunks) == chunk  # x is 1.3 MB: every chunk but the last is full
        raise _Stop  # no server needed: the body is what is checked

    monkeypatch.setattr(link_mod.wire, "encode_chunks", spy)
    path = tmp_path / "link.json"
    if cap:
        path.write_text(json.dumps({"up_bps": cap, "down_bps": cap}))
    link = HttpLink("http://127.0.0.1:9", "dev-a", "t" * 24, rate_limit=RateLimit(str(path)))
    with pytest.raises(_Stop):
        link.step(0, 1, torch.randn(40, 32, 16, 16), torch.zeros(40, dtype=torch.int64))
    link.close()
    assert seen == [expected]


def test_server_timing_is_read_by_name_and_bad_values_are_left_out():
    from ares.runtime.link import parse_server_timing

    assert parse_server_timing("compute;dur=12.5, held;dur=20") == {"compute": 0.0125, "held": 0.02}
    assert parse_server_timing("held;desc=x;dur=3,compute;dur=1") == {"held": 0.003, "compute": 0.001}
    assert parse_server_timing("compute;dur=abc, held;dur=-1, x;dur=inf, y;dur=nan") == {}
    assert parse_server_timing(None) == {} and parse_server_timing("") == {}
