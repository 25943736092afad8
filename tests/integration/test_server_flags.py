"""`ares server --port/--host` choose where the server listens and write nothing anywhere."""

from __future__ import annotations

import httpx

from tests.support import ServerProcess, free_port, small_config, token


class ListeningAt(ServerProcess):
    def __init__(self, cfg, tmp, port: int):
        self.url = f"http://127.0.0.1:{port}"
        super().__init__(cfg, tmp, extra_args=("--port", str(port), "--host", "127.0.0.1"))


def test_port_flag_overrides_the_config_and_leaves_no_file(tmp_path, monkeypatch):
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where a copy of the config went
    cfg = small_config(tmp_path)  # its own port, which the flag replaces
    port = free_port()
    assert port != cfg.port
    server = ListeningAt(cfg, tmp_path, port)
    try:
        reply = httpx.get(f"{server.url}/v1/round", headers={"Authorization": f"Bearer {token(cfg, 'dev-a')}"},
                          timeout=10)
        assert reply.status_code == 200, reply.text
        assert reply.json()["round"] == 0
        assert not list(scratch.glob("*.yaml"))
    finally:
        server.stop()
    assert not list(scratch.glob("*.yaml"))
