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
class JobPolicy:
    """What a job's spec may ask of the cluster: the administrator's limits (chart values
    `jobPolicy.*`). A job is untrusted input from whoever may create one in a namespace."""

    allowed_images: tuple[str, ...] = ()
    """Images a job may name for its trainer or server (spec.server.image, devices[].image),
    besides the operator's own (`ImageSettings`). An entry ending in `*` allows every reference
    that starts with the rest (`registry.example.com/team-a/*`); any other entry is one exact
    reference. Empty: only the operator's own images."""
    allowed_host_paths: tuple[str, ...] = (c.DEFAULT_ALLOWED_HOST_PATH,)
    """Host directories a job's dataset.path may be (or be under). The data is mounted read-only."""

    def image_allowed(self, image: str, images: "ImageSettings") -> bool:
        if image in (images.server, images.device, images.device_jetson):
            return True
        return any(image.startswith(entry[:-1]) if entry.endswith("*") else image == entry
                   for entry in self.allowed_images)

    def host_path_allowed(self, path: str) -> bool:
        """`path` is absolute, has no `.`/`..`/empty segment, and lies under an allowed prefix
        (never under the checkpoint root, where other jobs' checkpoints live)."""
        if not path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")[1:]):
            return False
        if _under(path, c.CHECKPOINT_HOST_ROOT):
            return False
        return any(_under(path, prefix) for prefix in self.allowed_host_paths)


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/") or "/"
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


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
    policy: JobPolicy = JobPolicy()
    server: ServerAccessSettings = ServerAccessSettings()
    metrics: MetricsSettings = MetricsSettings()
    watch_namespaces: tuple[str, ...] = ()
    """The namespaces the operator handles (as kopf is told with --namespace); empty: all."""
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
    policy = JobPolicy(
        allowed_images=_list(env.get(c.ENV_ALLOWED_IMAGES, "")),
        allowed_host_paths=_list(env.get(c.ENV_ALLOWED_HOST_PATHS, c.DEFAULT_ALLOWED_HOST_PATH)),
    )
    level = env.get(c.ENV_LOG_LEVEL, OperatorSettings.log_level).upper()
    return OperatorSettings(images=images, policy=policy, server=server,
                            watch_namespaces=_list(env.get(c.ENV_WATCH_NAMESPACES, "")), metrics=metrics, tick_s=tick_seconds(env),
                            log_level=level)


def _list(value: str) -> tuple[str, ...]:
    """A comma-separated environment value as its non-empty entries."""
    return tuple(part.strip() for part in value.split(",") if part.strip())
