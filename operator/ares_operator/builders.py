"""Pure functions from a job's spec to the objects it needs, as plain dicts.

Nothing here talks to the API or imports kopf: every function returns the full object the
operator creates, with labels and a controller owner reference, so a unit test compares whole
objects and the handlers only create what they are given.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from ares.core.config import CONTROLLER_TOKEN_NAME, DataConfig, ServerConfig, TrainingConfig
from ares_operator import constants as c
from ares_operator.settings import OperatorSettings
from ares_operator.spec import DeviceSpec, JobSpec

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

    def server_host(self) -> str:
        """The Service's in-cluster DNS name (what device pods and sidecars dial)."""
        return f"{self.server_name}.{self.namespace}.svc"


# --- metadata --------------------------------------------------------------------------------

def owner_reference(job: JobRef) -> Obj:
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": job.name, "uid": job.uid,
            "controller": True, "blockOwnerDeletion": True}


def labels(job: JobRef, role: str | None = None, device: str | None = None) -> dict[str, str]:
    out = {c.LABEL_JOB: job.name, c.LABEL_MANAGED_BY: c.MANAGED_BY}
    if role:
        out[c.LABEL_ROLE] = role
    if device:
        out[c.LABEL_DEVICE] = device
    return out


def _meta(job: JobRef, name: str, role: str | None = None, device: str | None = None,
          annotations: Mapping[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": job.namespace, "labels": labels(job, role, device),
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


def host_control_annotations(device: DeviceSpec) -> dict[str, str]:
    """What the sidecar applies: power mode and bandwidth cap ('' = leave as is / no cap)."""
    return {c.ANNOTATION_POWER_MODE: device.power_mode, c.ANNOTATION_BANDWIDTH: device.bandwidth or ""}


# --- tokens and config -------------------------------------------------------------------------

def tokens(spec: JobSpec, existing: Mapping[str, str], new_token: Callable[[], str]) -> dict[str, str]:
    """One bearer token per device plus the controller's; existing ones are kept (idempotent)."""
    names = [d.name for d in spec.devices] + [CONTROLLER_TOKEN_NAME]
    return {n: existing[n] if n in existing else new_token() for n in names}


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
        round_deadline_s=spec.run_policy.round_deadline_seconds,
        checkpoint_dir=c.CHECKPOINT_DIR,
        port=c.SERVER_PORT,
    )


def config_map(job: JobRef, spec: JobSpec) -> Obj:
    text = yaml.safe_dump(server_config(spec).model_dump(mode="json"), sort_keys=True)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(job, job.config_name),
            "data": {c.SERVER_CONFIG_KEY: text}}


# --- server -----------------------------------------------------------------------------------

def _data_volume(spec: JobSpec) -> Obj:
    """Synthetic data needs no files; real data sets live on each node's disk."""
    if spec.dataset.name == "synthetic":
        return {"name": "data", "emptyDir": {}}
    return {"name": "data", "hostPath": {"path": spec.dataset.path, "type": "DirectoryOrCreate"}}


def _checkpoint_volume(job: JobRef, spec: JobSpec) -> Obj:
    """Outlives the server pod: a PVC when named, else a hostPath on the server's node."""
    if spec.server.checkpoint_claim:
        return {"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.server.checkpoint_claim}}
    path = f"{c.CHECKPOINT_HOST_ROOT}/{job.namespace}/{job.name}"
    return {"name": "checkpoints", "hostPath": {"path": path, "type": "DirectoryOrCreate"}}


def _placement(node_name: str | None, node_selector: Mapping[str, str]) -> Obj:
    if node_name:
        return {"nodeName": node_name}
    return {"nodeSelector": dict(node_selector)} if node_selector else {}


_RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def server_pod(job: JobRef, spec: JobSpec, settings: OperatorSettings) -> Obj:
    container = {
        "name": c.CONTAINER_SERVER,
        "image": spec.server.image or settings.images.server,
        "command": ["ares"],
        "args": ["server", "--config", f"{c.SERVER_CONFIG_DIR}/{c.SERVER_CONFIG_KEY}",
                 "--tls-cert", f"{c.TLS_DIR}/{c.TLS_CERT_KEY}", "--tls-key", f"{c.TLS_DIR}/{c.TLS_KEY_KEY}"],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "ports": [{"name": c.SERVER_PORT_NAME, "containerPort": c.SERVER_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": c.SERVER_PORT_NAME, "scheme": "HTTPS"}, "periodSeconds": 5},
        "resources": dict(spec.server.resources),
        "securityContext": _RESTRICTED,
        "volumeMounts": [
            {"name": "config", "mountPath": c.SERVER_CONFIG_DIR, "readOnly": True},
            {"name": "tls", "mountPath": c.TLS_DIR, "readOnly": True},
            {"name": "tokens", "mountPath": c.TOKENS_DIR, "readOnly": True},
            {"name": "checkpoints", "mountPath": c.CHECKPOINT_DIR},
            {"name": "data", "mountPath": c.DATA_DIR},
        ],
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",  # the operator replaces a failed server (and counts it)
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": job.config_name}},
            {"name": "tls", "secret": {"secretName": job.tls_secret_name, "defaultMode": c.TLS_FILE_MODE, "items": [
                {"key": c.TLS_CERT_KEY, "path": c.TLS_CERT_KEY}, {"key": c.TLS_KEY_KEY, "path": c.TLS_KEY_KEY}]}},
            {"name": "tokens", "secret": {"secretName": job.secret_name, "defaultMode": 0o400}},
            _checkpoint_volume(job, spec),
            _data_volume(spec),
        ],
        **_placement(spec.server.node_name, spec.server.node_selector),
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


# --- devices ------------------------------------------------------------------------------------

def device_image(device: DeviceSpec, settings: OperatorSettings) -> str:
    if device.image:
        return device.image
    return settings.images.device_jetson if device.device_class in c.JETSON_CLASSES else settings.images.device


def _sidecar(job: JobRef, device: DeviceSpec, image: str) -> Obj:
    """Applies power mode and bandwidth from the annotations; reads board power for the trainer."""
    jetson = device.device_class in c.JETSON_CLASSES
    args = ["sidecar", "--annotations", f"{c.PODINFO_DIR}/{c.PODINFO_ANNOTATIONS}",
            "--server", job.server_host(), "--interface", c.NETWORK_INTERFACE, "--state-dir", c.STATE_DIR]
    mounts = [{"name": "podinfo", "mountPath": c.PODINFO_DIR, "readOnly": True},
              {"name": "state", "mountPath": c.STATE_DIR}]
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
    return {"name": c.CONTAINER_SIDECAR, "image": image, "command": ["ares"], "args": args,
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
            "securityContext": security, "volumeMounts": mounts,
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}}


def device_pod(job: JobRef, spec: JobSpec, device: DeviceSpec, settings: OperatorSettings,
               split: int, attempt: int = 0) -> Obj:
    """One device's pod: the trainer plus the host-control sidecar, pinned to the device's node."""
    image = device_image(device, settings)
    jetson = device.device_class in c.JETSON_CLASSES
    args = ["device",
            "--server", f"https://{job.server_host()}:{c.SERVER_PORT}",
            "--ca", f"{c.CA_DIR}/{c.TLS_CA_KEY}",
            "--name", device.name,
            "--token-file", f"{c.DEVICE_TOKEN_DIR}/token",
            "--split-file", f"{c.PODINFO_DIR}/{c.PODINFO_SPLIT}",
            "--data-dir", c.DATA_DIR,
            "--power-file", f"{c.STATE_DIR}/{c.POWER_FILE}",
            "--device-class", device.device_class]
    if device.power_mode:
        args += ["--power-mode", device.power_mode]
    trainer = {
        "name": c.CONTAINER_DEVICE, "image": image, "command": ["ares"], "args": args,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": dict(device.resources),
        "securityContext": _RESTRICTED,
        "volumeMounts": [
            {"name": "token", "mountPath": c.DEVICE_TOKEN_DIR, "readOnly": True},
            {"name": "ca", "mountPath": c.CA_DIR, "readOnly": True},
            {"name": "podinfo", "mountPath": c.PODINFO_DIR, "readOnly": True},
            {"name": "state", "mountPath": c.STATE_DIR, "readOnly": True},
            {"name": "data", "mountPath": c.DATA_DIR},
        ],
    }
    volumes = [
        {"name": "token", "secret": {"secretName": job.secret_name, "defaultMode": 0o400,
                                     "items": [{"key": device.name, "path": "token"}]}},
        {"name": "podinfo", "downwardAPI": {"items": [
            {"path": c.PODINFO_SPLIT, "fieldRef": {"fieldPath": f"metadata.annotations['{c.ANNOTATION_SPLIT}']"}},
            {"path": c.PODINFO_ANNOTATIONS, "fieldRef": {"fieldPath": "metadata.annotations"}},
        ]}},
        {"name": "state", "emptyDir": {}},
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
        "containers": [trainer, _sidecar(job, device, image)],
        "volumes": volumes,
        **_placement(device.node_name, device.node_selector),
    }
    if jetson:
        pod_spec["runtimeClassName"] = c.JETSON_RUNTIME_CLASS
    annotations = {c.ANNOTATION_SPLIT: str(split), **host_control_annotations(device),
                   c.ANNOTATION_ATTEMPT: str(attempt)}
    meta = _meta(job, job.device_pod_name(device.name), c.ROLE_DEVICE, device.name, annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}
