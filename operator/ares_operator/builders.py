"""Pure functions from a job's spec to the objects it needs, as plain dicts.

Nothing here talks to the API or imports kopf: every function returns the full object the
operator creates, with labels and a controller owner reference, so a unit test compares whole
objects and the handlers only create what they are given.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from ares.core.config import CONTROLLER_TOKEN_NAME, AggregationConfig, DataConfig, ServerConfig, TrainingConfig
from ares.core.sharding import shard_for
from ares.runtime.splitfile import StepOptions
from ares_operator import constants as c
from ares_operator.settings import OperatorSettings
from ares_operator.spec import DeviceSpec, JobSpec, _Scheduling

Obj = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class JobRef:
    """Who owns the children: enough of the AresTrainingJob's metadata to name and adopt them."""

    name: str
    namespace: str
    uid: str

    @property
    def server_name(self) -> str:
        return f"{self.name}-server"

    @property
    def secret_name(self) -> str:
        return f"{self.name}-tokens"

    @property
    def tls_secret_name(self) -> str:
        return f"{self.name}-tls"

    @property
    def config_name(self) -> str:
        return f"{self.name}-config"

    def device_pod_name(self, device: str) -> str:
        return f"{self.name}-{device}"

    def shard_name(self, index: int) -> str:
        """Shard `index`'s pod and Service (a job with spec.server.shards > 1)."""
        return f"{self.name}-shard-{index}"

    def server_host(self) -> str:
        """The Service's in-cluster DNS name (what device pods and sidecars dial; with shards, the root's)."""
        return f"{self.server_name}.{self.namespace}.svc"

    def shard_host(self, index: int) -> str:
        """Shard `index`'s Service in-cluster DNS name (what its devices dial)."""
        return f"{self.shard_name(index)}.{self.namespace}.svc"

    @property
    def checkpoint_key(self) -> str:
        """Where this job's checkpoints live under the checkpoint root: keyed by uid, so a new job
        that takes a deleted one's name never resumes the deleted job's state."""
        return f"{self.namespace}/{self.name}-{self.uid}"


# --- metadata --------------------------------------------------------------------------------

def owner_reference(job: JobRef) -> Obj:
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": job.name, "uid": job.uid,
            "controller": True, "blockOwnerDeletion": True}


def labels(job: JobRef, role: str | None = None, device: str | None = None,
           shard: int | None = None) -> dict[str, str]:
    out = {c.LABEL_JOB: job.name, c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_APP_NAME: c.APP_NAME,
           c.LABEL_APP_INSTANCE: job.name, c.LABEL_APP_PART_OF: c.APP_NAME}
    if role:
        out[c.LABEL_ROLE] = role
        out[c.LABEL_APP_COMPONENT] = role
    if device:
        out[c.LABEL_DEVICE] = device
    if shard is not None:
        out[c.LABEL_SHARD] = str(shard)
    return out


def _meta(job: JobRef, name: str, role: str | None = None, device: str | None = None,
          annotations: Mapping[str, str] | None = None, shard: int | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": job.namespace, "labels": labels(job, role, device, shard),
                 "ownerReferences": [owner_reference(job)]}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


# --- split points ------------------------------------------------------------------------------

def initial_split(spec: JobSpec, device: DeviceSpec, layers: int) -> int:
    """Pinned split, else the job's split.point, else (adaptive) the middle of the model.

    `none` is plain federated learning: every layer on the device. An adaptive job starts in
    the middle so its first round measures both sides of the split and the link between them
    (with every layer on the device no activations travel, and the link stays unmeasured).
    """
    if spec.split.mode == "none":
        return layers - 1
    if device.split is not None:
        return device.split
    if spec.split.point is not None:
        return spec.split.point
    return layers // 2


def pinned_splits(spec: JobSpec) -> dict[str, int]:
    """Splits the optimiser must leave alone: pinned devices, or every device unless adaptive."""
    if spec.split.mode == "adaptive":
        return {d.name: d.split for d in spec.devices if d.split is not None}
    layers = c.MODEL_LAYERS[spec.model]
    return {d.name: initial_split(spec, d, layers) for d in spec.devices}


def step_options_annotation(codec: str, micro_batches: int) -> str:
    """The `ares.io/step-options` value: the JSON the device reads from `<split file>.options`."""
    return StepOptions(codec=codec, micro_batches=micro_batches).model_dump_json()


def host_control_annotations(device: DeviceSpec, planned_mode: str | None = None) -> dict[str, str]:
    """What the sidecar applies: power mode and bandwidth cap ('' = leave as is / no cap). A mode in
    the spec wins; else the plan's (a job with split.choosePowerModes), where there is one."""
    return {c.ANNOTATION_POWER_MODE: device.power_mode or planned_mode or "", c.ANNOTATION_BANDWIDTH: device.bandwidth or ""}


def pinned_modes(spec: JobSpec) -> dict[str, str]:
    """Power modes the optimiser must leave alone: the Jetsons whose powerMode the spec sets."""
    return {d.name: d.power_mode for d in spec.devices if d.power_mode}


# --- tokens and config -------------------------------------------------------------------------

def token_names(spec: JobSpec) -> list[str]:
    """The token Secret's keys: one per device, the controller's, and (with shards) the shards'."""
    names = [d.name for d in spec.devices] + [CONTROLLER_TOKEN_NAME]
    return names + [c.SHARD_TOKEN_KEY] if spec.server.shards > 1 else names


def tokens(spec: JobSpec, existing: Mapping[str, str], new_token: Callable[[], str]) -> dict[str, str]:
    """One bearer token per device plus the controller's (and the shards' one, shared by the root
    and every shard); existing ones are kept (idempotent)."""
    return {n: existing[n] if n in existing else new_token() for n in token_names(spec)}


def decode_secret(secret: Mapping[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def tokens_secret(job: JobRef, values: Mapping[str, str]) -> Obj:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(job, job.secret_name), "data": data}


def server_config(spec: JobSpec) -> ServerConfig:
    """The server's whole configuration, written into the ConfigMap as server.yaml."""
    ds, tr = spec.dataset, spec.training
    return ServerConfig(
        model=spec.model,
        data=DataConfig(name=ds.name, path=c.DATA_DIR, partition=ds.partition, beta=ds.beta,
                        synthetic_train=ds.synthetic_train, synthetic_test=ds.synthetic_test, seed=ds.seed),
        training=TrainingConfig(rounds=tr.rounds, batch_size=tr.batch_size, lr=tr.lr, momentum=tr.momentum,
                                lr_decay_round=tr.lr_decay_round, lr_decay=tr.lr_decay,
                                max_steps_per_round=tr.max_steps_per_round, seed=tr.seed),
        devices=tuple(d.name for d in spec.devices),
        tokens_dir=c.TOKENS_DIR,
        codec=tr.codec,
        micro_batches=tr.micro_batches,
        aggregation=AggregationConfig(**tr.aggregation.model_dump()),
        round_deadline_s=spec.run_policy.round_deadline_seconds,
        checkpoint_dir=c.CHECKPOINT_DIR,
        port=c.SERVER_PORT,
        shards=spec.server.shards,
        shard_pins=spec.shard_pins() if spec.server.shards > 1 else {},
    )


def config_map(job: JobRef, spec: JobSpec) -> Obj:
    text = yaml.safe_dump(server_config(spec).model_dump(mode="json"), sort_keys=True)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(job, job.config_name),
            "data": {c.SERVER_CONFIG_KEY: text}}


# --- server -----------------------------------------------------------------------------------

def _data_volume(spec: JobSpec) -> Obj:
    """Generated data needs no files; real data sets live on each node's disk, in a directory
    the job policy allows (validation.policy_problems), mounted read-only (`_DATA_MOUNT`)."""
    if spec.dataset.name in c.GENERATED_DATASETS:
        return {"name": "data", "emptyDir": {}}
    return {"name": "data", "hostPath": {"path": spec.dataset.path, "type": "DirectoryOrCreate"}}


_DATA_MOUNT = {"name": "data", "mountPath": c.DATA_DIR, "readOnly": True}


def _checkpoint_volume(job: JobRef, spec: JobSpec) -> Obj:
    """Outlives the server pod: a PVC when named, else a hostPath on the server's node.

    Either way the server mounts only this job's directory (`JobRef.checkpoint_key`): a sub-path
    of the claim, or a hostPath directory of its own.
    """
    if spec.server.checkpoint_claim:
        return {"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.server.checkpoint_claim}}
    path = f"{c.CHECKPOINT_HOST_ROOT}/{job.checkpoint_key}"
    return {"name": "checkpoints", "hostPath": {"path": path, "type": "DirectoryOrCreate"}}


def _checkpoint_mount(job: JobRef, spec: JobSpec) -> Obj:
    mount: Obj = {"name": "checkpoints", "mountPath": c.CHECKPOINT_DIR}
    if spec.server.checkpoint_claim:
        mount["subPath"] = job.checkpoint_key
    return mount


def _placement(where: _Scheduling) -> Obj:
    """nodeName or nodeSelector, tolerations, affinity, imagePullSecrets, priorityClassName."""
    out: Obj = {}
    if where.node_name:
        out["nodeName"] = where.node_name
    elif where.node_selector:
        out["nodeSelector"] = dict(where.node_selector)
    if where.tolerations:
        out["tolerations"] = [dict(t) for t in where.tolerations]
    if where.affinity:
        out["affinity"] = dict(where.affinity)
    if where.image_pull_secrets:
        out["imagePullSecrets"] = [dict(s) for s in where.image_pull_secrets]
    if where.priority_class_name:
        out["priorityClassName"] = where.priority_class_name
    return out


# Every container but the host-control sidecar and the checkpoint init step: no capabilities,
# no privilege escalation, never root (the pod's securityContext sets the user and group).
_RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def pod_security(jetson: bool = False) -> Obj:
    """The pods' securityContext: uid/gid APP_UID, fsGroup (token files readable through the
    group), the runtime's default seccomp profile. On Jetson the trainer also joins the `video`
    group, which owns the GPU's device nodes (/dev/nvhost-*, 0660) that the NVIDIA runtime mounts."""
    out: Obj = {"runAsUser": c.APP_UID, "runAsGroup": c.APP_GID, "runAsNonRoot": True, "fsGroup": c.APP_GID,
                "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    if jetson:
        out["supplementalGroups"] = [c.JETSON_VIDEO_GID]
    return out


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: Any) -> float | None:
    """A Kubernetes quantity as a number ('500m' -> 0.5, '2Gi' -> 2**31); None if unreadable."""
    m = _QUANTITY.match(str(value).strip())
    if not m or m.group(2) not in _SUFFIX:
        return None
    try:
        return float(m.group(1)) * _SUFFIX[m.group(2)]
    except ValueError:
        return None


def resources(container: str, given: Mapping[str, Any]) -> Obj:
    """The job's requests and limits, with defaults (`constants.DEFAULT_RESOURCES`) for the rest.

    A default limit is raised to the job's own request when that is higher, and left out when
    the request cannot be read (the API server refuses that quantity anyway); a default request
    above the job's own limit is lowered to it. So the result is always a valid pair.
    """
    default = c.DEFAULT_RESOURCES[container]
    asked_requests = dict(given.get("requests") or {})
    asked_limits = dict(given.get("limits") or {})
    requests = {**default["requests"], **asked_requests}
    limits = dict(asked_limits)
    for name, value in default["limits"].items():
        if name in limits:
            continue
        want = quantity(requests[name]) if name in requests else 0.0
        if want is not None:
            limits[name] = value if (quantity(value) or 0.0) >= want else requests[name]
    for name, cap in asked_limits.items():
        if name in requests and name not in asked_requests:
            want, most = quantity(requests[name]), quantity(cap)
            if want is not None and most is not None and want > most:
                requests[name] = cap
    # YAML integers (`cpu: 2`) are quantities too; the API's models want them as strings.
    return {"requests": {k: _quantity_text(v) for k, v in requests.items()},
            "limits": {k: _quantity_text(v) for k, v in limits.items()}}


def _quantity_text(value: Any) -> str:
    return format(value, "f").rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def _prepare_checkpoints(job: JobRef, spec: JobSpec, image: str) -> Obj:
    """Init step: make the job's checkpoint directory the server's (a hostPath or a claim's sub-path
    is created root-owned). Root with CHOWN only; it exits before the server starts."""
    return {"name": c.CONTAINER_PREPARE, "image": image, "command": ["chown"],
            "args": [f"{c.APP_UID}:{c.APP_GID}", c.CHECKPOINT_DIR],
            "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}},
            "resources": resources(c.CONTAINER_PREPARE, {}),
            "volumeMounts": [_checkpoint_mount(job, spec)]}


# The server's startup probe: exits 0 as soon as something accepts TCP connections on 127.0.0.1:PORT
# (the server listens only once it can serve), 1 after SECONDS without.
WAIT_FOR_PORT = """import socket, sys, time
port, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while True:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        if time.monotonic() > end:
            sys.exit(1)
        time.sleep(0.2)
"""
STARTUP_WAIT_S = 60


def server_pod(job: JobRef, spec: JobSpec, settings: OperatorSettings) -> Obj:
    image = spec.server.image or settings.images.server
    # The init step runs as root (CHOWN): always the administrator's image, never the job's.
    prepare_image = settings.images.server
    container = {
        "name": c.CONTAINER_SERVER,
        "image": image,
        "command": ["ares"],
        "args": ["server", "--config", f"{c.SERVER_CONFIG_DIR}/{c.SERVER_CONFIG_KEY}",
                 "--tls-cert", f"{c.TLS_DIR}/{c.TLS_CERT_KEY}", "--tls-key", f"{c.TLS_DIR}/{c.TLS_KEY_KEY}"],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "ports": [{"name": c.SERVER_PORT_NAME, "containerPort": c.SERVER_PORT, "protocol": "TCP"}],
        # It serves HTTP once torch is imported, the data set loaded, the model built and the
        # checkpoint read: seconds to minutes (25 s for the example job on two cores busy with
        # other work), longer with a large data set or checkpoint. The startup probe waits for
        # that inside one attempt (`WAIT_FOR_PORT`, up to a minute), so that a start of normal
        # length fails no probe: the kubelet records a Warning Event (Unhealthy) for every failed
        # attempt, and an httpGet probe asked every few seconds failed "connection refused" until
        # the server listened. Only after 5 minutes is the server killed, and its pod replaced as
        # a failed one. The readiness probe runs once it has passed and follows serving (the
        # Service's endpoints).
        "startupProbe": {"exec": {"command": ["python3", "-c", WAIT_FOR_PORT, str(c.SERVER_PORT),
                                              str(STARTUP_WAIT_S)]},
                         "periodSeconds": 1, "timeoutSeconds": STARTUP_WAIT_S + 5, "failureThreshold": 5},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": c.SERVER_PORT_NAME, "scheme": "HTTPS"},
                           "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "resources": resources(c.CONTAINER_SERVER, spec.server.resources),
        "securityContext": _RESTRICTED,
        "volumeMounts": [
            {"name": "config", "mountPath": c.SERVER_CONFIG_DIR, "readOnly": True},
            {"name": "tls", "mountPath": c.TLS_DIR, "readOnly": True},
            {"name": "tokens", "mountPath": c.TOKENS_DIR, "readOnly": True},
            _checkpoint_mount(job, spec),
            dict(_DATA_MOUNT),
        ],
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",  # the operator replaces a failed server (and counts it)
        "automountServiceAccountToken": False,
        "securityContext": pod_security(),
        "initContainers": [_prepare_checkpoints(job, spec, prepare_image)],
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": job.config_name}},
            {"name": "tls", "secret": {"secretName": job.tls_secret_name, "defaultMode": c.TLS_FILE_MODE, "items": [
                {"key": c.TLS_CERT_KEY, "path": c.TLS_CERT_KEY}, {"key": c.TLS_KEY_KEY, "path": c.TLS_KEY_KEY}]}},
            {"name": "tokens", "secret": {"secretName": job.secret_name, "defaultMode": c.TOKEN_FILE_MODE}},
            _checkpoint_volume(job, spec),
            _data_volume(spec),
        ],
        **_placement(spec.server),
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _meta(job, job.server_name, c.ROLE_SERVER),
            "spec": pod_spec}


def service(job: JobRef) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(job, job.server_name, c.ROLE_SERVER),
        "spec": {
            "selector": {c.LABEL_JOB: job.name, c.LABEL_ROLE: c.ROLE_SERVER},
            "ports": [{"name": c.SERVER_PORT_NAME, "port": c.SERVER_PORT,
                       "targetPort": c.SERVER_PORT_NAME, "protocol": "TCP"}],
        },
    }


# --- shards (spec.server.shards > 1) ----------------------------------------------------------
# The server pod above is then the root: round clock, global model, merge, evaluation,
# checkpoints, status; it holds no device sessions. Each shard has a pod and a Service of its own
# and holds the sessions of the devices `ares.core.sharding` assigns it, the rule the servers use.

def shard_of(spec: JobSpec) -> dict[str, int]:
    """Each device's shard (0 for every device of an unsharded job), as the servers compute it: its
    pin (`devices[].shard`) or the hashing."""
    pins = spec.shard_pins()
    return {d.name: shard_for(d.name, spec.server.shards, pins) for d in spec.devices}


def shard_devices(spec: JobSpec) -> list[list[str]]:
    """Each shard's devices, in the spec's order."""
    out: list[list[str]] = [[] for _ in range(spec.server.shards)]
    for name, index in shard_of(spec).items():
        out[index].append(name)
    return out


def device_server_host(job: JobRef, spec: JobSpec, device: str) -> str:
    """The host a device's pod dials: its shard's Service, or the server's in an unsharded job."""
    if spec.server.shards <= 1:
        return job.server_host()
    return job.shard_host(shard_for(device, spec.server.shards, spec.shard_pins()))


def root_url(job: JobRef) -> str:
    """What each shard follows: the root's Service, over TLS."""
    return f"https://{job.server_host()}:{c.SERVER_PORT}"


def shard_pod(job: JobRef, spec: JobSpec, settings: OperatorSettings, index: int) -> Obj:
    """Shard `index`: `ares server --shard I --root <root Service>` trusting only the job's CA for
    the root, serving its devices with the job's certificate (which names every shard Service).

    Built as the server pod is (image, probes, resources, placement, the same config) but without
    checkpoints (the root keeps them: no init step, an emptyDir where the server's checkpoints
    are) and with only the tokens it reads: its devices', the controller's and the shard token."""
    pod = server_pod(job, spec, settings)
    pod["metadata"] = _meta(job, job.shard_name(index), c.ROLE_SHARD, shard=index)
    pod_spec = pod["spec"]
    pod_spec.pop("initContainers")
    container = pod_spec["containers"][0]
    container["args"] = [*container["args"], "--shard", str(index), "--root", root_url(job),
                         "--ca", f"{c.CA_DIR}/{c.TLS_CA_KEY}"]
    container["volumeMounts"] = [
        *(m for m in container["volumeMounts"] if m["name"] != "checkpoints"),
        {"name": "checkpoints", "mountPath": c.CHECKPOINT_DIR},
        {"name": "ca", "mountPath": c.CA_DIR, "readOnly": True},
    ]
    keys = [*shard_devices(spec)[index], CONTROLLER_TOKEN_NAME, c.SHARD_TOKEN_KEY]
    volumes: list[Obj] = []
    for volume in pod_spec["volumes"]:
        if volume["name"] == "tokens":
            volume = {"name": "tokens", "secret": {"secretName": job.secret_name, "defaultMode": c.TOKEN_FILE_MODE,
                                                   "items": [{"key": k, "path": k} for k in keys]}}
        elif volume["name"] == "checkpoints":
            volume = {"name": "checkpoints", "emptyDir": {}}
        volumes.append(volume)
    volumes.append({"name": "ca", "secret": {"secretName": job.tls_secret_name, "defaultMode": c.TLS_FILE_MODE,
                                             "items": [{"key": c.TLS_CA_KEY, "path": c.TLS_CA_KEY}]}})
    pod_spec["volumes"] = volumes
    return pod


def shard_service(job: JobRef, index: int) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(job, job.shard_name(index), c.ROLE_SHARD, shard=index),
        "spec": {
            "selector": {c.LABEL_JOB: job.name, c.LABEL_ROLE: c.ROLE_SHARD, c.LABEL_SHARD: str(index)},
            "ports": [{"name": c.SERVER_PORT_NAME, "port": c.SERVER_PORT,
                       "targetPort": c.SERVER_PORT_NAME, "protocol": "TCP"}],
        },
    }


def services(job: JobRef, spec: JobSpec) -> list[Obj]:
    """The server's (the root's) Service, then one a shard."""
    shards = spec.server.shards
    return [service(job), *(shard_service(job, i) for i in range(shards if shards > 1 else 0))]


def shard_pods(job: JobRef, spec: JobSpec, settings: OperatorSettings) -> list[Obj]:
    shards = spec.server.shards
    return [shard_pod(job, spec, settings, i) for i in range(shards if shards > 1 else 0)]


# --- devices ------------------------------------------------------------------------------------

def device_image(device: DeviceSpec, settings: OperatorSettings) -> str:
    """The trainer's image: the job's own (if the job policy allows it), else the operator's."""
    return device.image or host_control_image(device, settings)


def host_control_image(device: DeviceSpec, settings: OperatorSettings) -> str:
    """The sidecar runs as root with NET_ADMIN (privileged on Jetson): only ever the
    administrator's image for the device's class, whatever the job asks for its trainer."""
    return settings.images.device_jetson if device.device_class in c.JETSON_CLASSES else settings.images.device


def _sidecar(job: JobRef, device: DeviceSpec, image: str, server_host: str) -> Obj:
    """Applies power mode and bandwidth from the annotations; reads board power for the trainer."""
    jetson = device.device_class in c.JETSON_CLASSES
    args = ["sidecar", "--annotations", f"{c.PODINFO_DIR}/{c.PODINFO_ANNOTATIONS}",
            "--server", server_host, "--interface", c.NETWORK_INTERFACE, "--state-dir", c.STATE_DIR,
            "--trainer-file", f"{c.TRAINER_STATE_DIR}/{c.TRAINER_FILE}"]
    mounts = [{"name": "podinfo", "mountPath": c.PODINFO_DIR, "readOnly": True},
              {"name": "state", "mountPath": c.STATE_DIR},
              {"name": "trainer-state", "mountPath": c.TRAINER_STATE_DIR, "readOnly": True}]
    if jetson:
        args += ["--nvpmodel", c.NVPMODEL_BIN, "--nvpmodel-conf", c.NVPMODEL_CONF, "--power-path", c.JETSON_POWER_PATH]
        mounts += [{"name": "nvpmodel", "mountPath": c.NVPMODEL_CONF, "readOnly": True},
                   {"name": "nvpmodel-bin", "mountPath": c.NVPMODEL_BIN, "readOnly": True},
                   {"name": "nvpmodel-state", "mountPath": c.NVPMODEL_STATE_DIR}]
        security: Obj = {"privileged": True}  # nvpmodel writes CPU/GPU clocks and core counts
    else:
        security = {"allowPrivilegeEscalation": False, "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}}
    # The image's default user is unprivileged; capabilities only work for root, so this one
    # container (and only it) runs as uid 0.
    security = {**security, "runAsUser": 0, "runAsNonRoot": False}
    # A native sidecar (Kubernetes 1.29+): an init container that keeps running beside the
    # trainer, so the pod's phase follows the trainer alone and the sidecar stops with it.
    return {"name": c.CONTAINER_SIDECAR, "image": image, "command": ["ares"], "args": args,
            "restartPolicy": "Always",
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
            "securityContext": security, "volumeMounts": mounts,
            "resources": resources(c.CONTAINER_SIDECAR, {})}


def device_pod(job: JobRef, spec: JobSpec, device: DeviceSpec, settings: OperatorSettings,
               split: int, attempt: int = 0, options: tuple[str, int] | None = None) -> Obj:
    """One device's pod: the trainer plus the host-control sidecar, pinned to the device's node.

    A job with a training.offer also projects `ares.io/step-options` beside the split file, set
    from the start to `options` (the plan's) or the job's own codec and micro-batches, so the
    file is never empty; a job without one has neither (the device runs the job's settings)."""
    image = device_image(device, settings)
    jetson = device.device_class in c.JETSON_CLASSES
    server_host = device_server_host(job, spec, device.name)
    args = ["device",
            "--server", f"https://{server_host}:{c.SERVER_PORT}",
            "--ca", f"{c.CA_DIR}/{c.TLS_CA_KEY}",
            "--name", device.name,
            "--token-file", f"{c.DEVICE_TOKEN_DIR}/token",
            "--split-file", f"{c.PODINFO_DIR}/{c.PODINFO_SPLIT}",
            "--data-dir", c.DATA_DIR,
            "--power-file", f"{c.STATE_DIR}/{c.POWER_FILE}",
            "--hostctl-file", f"{c.STATE_DIR}/{c.HOSTCTL_FILE}",
            "--trainer-file", f"{c.TRAINER_STATE_DIR}/{c.TRAINER_FILE}",
            "--device-class", device.device_class]
    if device.power_mode:
        args += ["--power-mode", device.power_mode]
    trainer = {
        "name": c.CONTAINER_DEVICE, "image": image, "command": ["ares"], "args": args,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": resources(c.CONTAINER_DEVICE, device.resources),
        "securityContext": _RESTRICTED,
        "volumeMounts": [
            {"name": "token", "mountPath": c.DEVICE_TOKEN_DIR, "readOnly": True},
            {"name": "ca", "mountPath": c.CA_DIR, "readOnly": True},
            {"name": "podinfo", "mountPath": c.PODINFO_DIR, "readOnly": True},
            {"name": "state", "mountPath": c.STATE_DIR, "readOnly": True},
            {"name": "trainer-state", "mountPath": c.TRAINER_STATE_DIR},
            dict(_DATA_MOUNT),
        ],
    }
    podinfo = [
        {"path": c.PODINFO_SPLIT, "fieldRef": {"fieldPath": f"metadata.annotations['{c.ANNOTATION_SPLIT}']"}},
        {"path": c.PODINFO_ANNOTATIONS, "fieldRef": {"fieldPath": "metadata.annotations"}},
    ]
    offered = bool(spec.training.offer_pairs())
    if offered:
        podinfo.append({"path": c.PODINFO_OPTIONS,
                        "fieldRef": {"fieldPath": f"metadata.annotations['{c.ANNOTATION_STEP_OPTIONS}']"}})
    volumes = [
        {"name": "token", "secret": {"secretName": job.secret_name, "defaultMode": c.TOKEN_FILE_MODE,
                                     "items": [{"key": device.name, "path": "token"}]}},
        {"name": "podinfo", "downwardAPI": {"items": podinfo}},
        {"name": "state", "emptyDir": {}},
        {"name": "trainer-state", "emptyDir": {}},  # the trainer's own: the root sidecar only reads it
        {"name": "ca", "secret": {"secretName": job.tls_secret_name, "defaultMode": c.TLS_FILE_MODE,
                                  "items": [{"key": c.TLS_CA_KEY, "path": c.TLS_CA_KEY}]}},
        _data_volume(spec),
    ]
    if jetson:
        volumes += [{"name": "nvpmodel", "hostPath": {"path": c.NVPMODEL_CONF, "type": "File"}},
                    {"name": "nvpmodel-bin", "hostPath": {"path": c.NVPMODEL_BIN, "type": "File"}},
                    {"name": "nvpmodel-state", "hostPath": {"path": c.NVPMODEL_STATE_DIR, "type": "DirectoryOrCreate"}}]
    pod_spec: Obj = {
        "restartPolicy": "Never",  # the operator replaces a failed pod, up to runPolicy.backoffLimit
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 10,
        "securityContext": pod_security(jetson),
        "initContainers": [_sidecar(job, device, host_control_image(device, settings), server_host)],
        "containers": [trainer],
        "volumes": volumes,
        **_placement(device),
    }
    if jetson:
        pod_spec["runtimeClassName"] = c.JETSON_RUNTIME_CLASS
    annotations = {c.ANNOTATION_SPLIT: str(split), **host_control_annotations(device),
                   c.ANNOTATION_ATTEMPT: str(attempt)}
    if offered:
        codec, k = options or (spec.training.codec, spec.training.micro_batches)
        annotations[c.ANNOTATION_STEP_OPTIONS] = step_options_annotation(codec, k)
    meta = _meta(job, job.device_pod_name(device.name), c.ROLE_DEVICE, device.name, annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def children(job: JobRef, spec: JobSpec, settings: OperatorSettings) -> list[Obj]:
    """Every object a job needs, in creation order: what the operator dry-runs before creating any
    (the Secret with placeholder tokens: a dry run stores nothing)."""
    layers = c.MODEL_LAYERS[spec.model]
    placeholder = {name: "dry-run" for name in token_names(spec)}
    return [tokens_secret(job, placeholder), config_map(job, spec), *services(job, spec),
            server_pod(job, spec, settings), *shard_pods(job, spec, settings),
            *(device_pod(job, spec, d, settings, initial_split(spec, d, layers)) for d in spec.devices)]
