"""The operator's own knobs: a small tree of frozen dataclasses, read once from the environment.

Every field has a default that works in a cluster; tests override them through the same
environment variables (see `constants.ENV_*`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from ares_operator import constants as c


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    server: str = "ghcr.io/ares-split/ares-server:0.1.0"
    """Image of the server pod, unless the job's spec.server.image says otherwise."""
    device: str = "ghcr.io/ares-split/ares-device:0.1.0"
    """Image of device pods on Raspberry Pi and plain CPU nodes."""
    device_jetson: str = "ghcr.io/ares-split/ares-device-jetson:0.1.0"
    """Image of device pods on Jetson nodes (community torch build for JetPack)."""


@dataclasses.dataclass(frozen=True)
class ServerAccessSettings:
    url_template: str = "https://{job}-server.{namespace}.svc:{port}"
    """How the operator reaches a job's server; fields: job, namespace, port. Whatever it dials,
    the server's certificate must be the job's CA's and carry `<job>-server.<namespace>.svc`."""
    timeout_s: float = 5.0
    """Per request to a server; a slow server is retried on the next tick, never waited for."""

    def url(self, job: str, namespace: str) -> str:
        return self.url_template.format(job=job, namespace=namespace, port=c.SERVER_PORT)


@dataclasses.dataclass(frozen=True)
class MetricsSettings:
    port: int = 8000
    """Port of the operator's own Prometheus /metrics (0: not served)."""
    address: str = "0.0.0.0"
    """Address it listens on."""


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    images: ImageSettings = ImageSettings()
    server: ServerAccessSettings = ServerAccessSettings()
    metrics: MetricsSettings = MetricsSettings()
    tick_s: float = 5.0
    """Interval of the per-job reconcile timer (pods, status, optimiser when due)."""
    log_level: str = "INFO"


def tick_seconds(env: Mapping[str, str] = os.environ) -> float:
    """The timer interval is needed when the handlers module is imported, before start-up."""
    return float(env.get(c.ENV_TICK_SECONDS, OperatorSettings.tick_s))


def from_env(env: Mapping[str, str] = os.environ) -> OperatorSettings:
    """Defaults, overridden by whatever of `constants.ENV_*` is set."""
    images = ImageSettings(
        server=env.get(c.ENV_SERVER_IMAGE, ImageSettings.server),
        device=env.get(c.ENV_DEVICE_IMAGE, ImageSettings.device),
        device_jetson=env.get(c.ENV_DEVICE_JETSON_IMAGE, ImageSettings.device_jetson),
    )
    server = ServerAccessSettings(
        url_template=env.get(c.ENV_SERVER_URL_TEMPLATE, ServerAccessSettings.url_template),
        timeout_s=float(env.get(c.ENV_HTTP_TIMEOUT, ServerAccessSettings.timeout_s)),
    )
    metrics = MetricsSettings(port=int(env.get(c.ENV_METRICS_PORT, MetricsSettings.port)),
                              address=env.get(c.ENV_METRICS_ADDRESS, MetricsSettings.address))
    level = env.get(c.ENV_LOG_LEVEL, OperatorSettings.log_level).upper()
    return OperatorSettings(images=images, server=server, metrics=metrics, tick_s=tick_seconds(env),
                            log_level=level)
