"""Checks on an AresTrainingJob that its schema cannot express (or that an emulator skips).

Pure: a raw spec in, a typed spec and a list of problems out. The operator refuses a job with
any problem (phase Failed, condition SpecValid=False, reason InvalidSpec, the problems in the
message) and creates nothing for it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any, Optional

import pydantic

from ares_operator import constants as c
from ares_operator.settings import OperatorSettings
from ares_operator.spec import JobSpec, parse_spec

MAX_NAME = 63  # Service and pod host names are DNS labels
SHARD_NAME = re.compile(r"^shard-[0-9]+$")  # device names a sharded job's shard pods take
STREAMING_METHODS = ("fedavg", "norm_clip")  # the aggregations shards can merge (a running sum)


def validate(name: str, raw_spec: Mapping[str, Any], settings: OperatorSettings = OperatorSettings(),
             model_layers: Mapping[str, int] = c.MODEL_LAYERS) -> tuple[Optional[JobSpec], list[str]]:
    """The typed spec (None if it does not even parse) and every problem found, in spec order:
    the spec's own consistency, then what the administrator's job policy (`settings.policy`)
    does not allow."""
    problems = _raw_problems(raw_spec)
    try:
        spec = parse_spec(raw_spec)
    except pydantic.ValidationError as exc:
        problems += [f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return None, problems
    return spec, problems + _spec_problems(name, spec, model_layers) + policy_problems(spec, settings)


def policy_problems(spec: JobSpec, settings: OperatorSettings) -> list[str]:
    """Images and host paths the administrator has not allowed (chart values `jobPolicy.*`).

    A job is untrusted input: it may pick its trainer's and server's image only among those
    allowed, and mount host data only from allowed directories (read-only). The host-control
    sidecar and the checkpoint init step always run the operator's own images, whatever the job says.
    """
    policy, images = settings.policy, settings.images
    problems: list[str] = []
    asked = [("spec.server.image", spec.server.image)]
    asked += [(f"spec.devices[{i}].image ({d.name})", d.image) for i, d in enumerate(spec.devices)]
    for where, image in asked:
        if image and not policy.image_allowed(image, images):
            problems.append(f"{where}: image {image!r} is not allowed in this cluster; allowed are the operator's "
                            "own images and those its administrator lists in the chart value "
                            "jobPolicy.allowedImages")
    if mounts_host_data(spec) and not policy.host_path_allowed(spec.dataset.path):
        allowed = ", ".join(policy.allowed_host_paths) or "none"
        problems.append(f"spec.dataset.path: {spec.dataset.path!r} is not an allowed host directory; it must be "
                        f"an absolute path without '.' or '..' under one of: {allowed} (chart value "
                        f"jobPolicy.allowedHostPaths), and not under {c.CHECKPOINT_HOST_ROOT}")
    return problems


def mounts_host_data(spec: JobSpec) -> bool:
    """Generated data sets need no files; the others read spec.dataset.path on each node."""
    return spec.dataset.name not in c.GENERATED_DATASETS


def _raw_problems(raw_spec: Mapping[str, Any]) -> list[str]:
    """Duplicates must be caught before parsing: nothing later can tell two entries apart."""
    names = [d.get("name") for d in raw_spec.get("devices") or [] if isinstance(d, Mapping)]
    dups = sorted(n for n, k in Counter(names).items() if k > 1)
    return [f"spec.devices: duplicate device names {dups}"] if dups else []


def _spec_problems(name: str, spec: JobSpec, model_layers: Mapping[str, int]) -> list[str]:
    problems: list[str] = []
    if len(f"{name}-server") > MAX_NAME:
        problems.append(f"metadata.name: {name!r} is too long; children are named <job>-<device> "
                        f"and must stay within {MAX_NAME} characters")
    problems += shard_problems(name, spec)
    layers = model_layers.get(spec.model)
    if layers is None:
        problems.append(f"spec.model: unknown model {spec.model!r}; known models: {', '.join(sorted(model_layers))}")
    valid = f"0..{layers - 1}" if layers else "unknown"
    if layers and spec.split.point is not None and spec.split.point >= layers:
        problems.append(f"spec.split.point: {spec.split.point} is out of range for {spec.model} (valid: {valid})")
    for i, dev in enumerate(spec.devices):
        where = f"spec.devices[{i}] ({dev.name})"
        if dev.name == c.ROLE_SERVER:
            problems.append(f"{where}: the name 'server' is taken by the job's server pod")
        if len(f"{name}-{dev.name}") > MAX_NAME:
            problems.append(f"{where}: pod name {name}-{dev.name} is longer than {MAX_NAME} characters")
        if layers and dev.split is not None and dev.split >= layers:
            problems.append(f"{where}: pinned split {dev.split} is out of range for {spec.model} (valid: {valid})")
        if dev.power_mode and dev.device_class not in c.JETSON_CLASSES:
            problems.append(f"{where}: powerMode {dev.power_mode} is for Jetson classes only, not {dev.device_class}")
        if dev.node_name and dev.node_selector:
            problems.append(f"{where}: give nodeName or nodeSelector, not both")
    for field, values in (("codecs", spec.training.offer.codecs), ("microBatches", spec.training.offer.micro_batches)):
        dups = sorted({v for v in values if values.count(v) > 1})
        if dups:
            problems.append(f"spec.training.offer.{field}: duplicate values {dups}")
    if spec.split.mode == "fixed" and spec.split.point is None:
        unpinned = [d.name for d in spec.devices if d.split is None]
        if unpinned:
            problems.append(f"spec.split: mode fixed needs split.point or a pinned split on devices {unpinned}")
    return problems


def shard_problems(name: str, spec: JobSpec) -> list[str]:
    """Every pinned device's shard below spec.server.shards; with shards > 1: an aggregation shards
    can merge, shard names within a DNS label, no device whose pod name a shard pod takes
    (<job>-shard-<i>)."""
    shards = spec.server.shards
    beyond = sorted(name for name, index in spec.shard_pins().items() if index >= shards)
    if beyond:
        return [f"spec.devices: {beyond[:5]} are pinned to a shard the job does not have: with server.shards "
                f"{shards}, a device's shard is 0..{shards - 1}"]
    if shards <= 1:
        return []
    problems: list[str] = []
    method = spec.training.aggregation.method
    if method not in STREAMING_METHODS:
        problems.append(f"spec.server.shards: {shards} shards cannot aggregate with {method}, which needs every "
                        f"upload at once; use {' or '.join(STREAMING_METHODS)}, or shards: 1")
    if len(f"{name}-shard-{shards - 1}") > MAX_NAME:
        problems.append(f"metadata.name: {name!r} is too long for {shards} shards; shard pods are named "
                        f"<job>-shard-<index> and must stay within {MAX_NAME} characters")
    taken = [d.name for d in spec.devices if SHARD_NAME.match(d.name)]
    if taken:
        problems.append(f"spec.devices: names {taken} are taken by a sharded job's shard pods (<job>-shard-<index>)")
    return problems
