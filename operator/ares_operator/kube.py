"""The operator's only door to the Kubernetes API for children (kopf patches the job itself).

Plain dicts in and out (responses are parsed as JSON, never into client models), and every
create treats 409 AlreadyExists as success, so re-running any handler is harmless.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

import kubernetes
from kubernetes.client.rest import ApiException

from ares_operator import constants as c

Obj = dict[str, Any]


def load_config() -> None:
    """In a pod: its service account; elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class Kube:
    def __init__(self, api: Optional[kubernetes.client.ApiClient] = None):
        self.api = api or kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def create(self, obj: Mapping[str, Any]) -> bool:
        """True if created, False if it already existed."""
        ns = obj["metadata"]["namespace"]
        create = {"Pod": self.core.create_namespaced_pod, "Service": self.core.create_namespaced_service,
                  "Secret": self.core.create_namespaced_secret,
                  "ConfigMap": self.core.create_namespaced_config_map}[obj["kind"]]
        try:
            create(ns, dict(obj), _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def read_secret(self, namespace: str, name: str) -> Optional[Obj]:
        try:
            resp = self.core.read_namespaced_secret(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def list_pods(self, namespace: str, job: str, uid: str) -> list[Obj]:
        """The job's pods: selected by label, kept only if the job controls them."""
        resp = self.core.list_namespaced_pod(namespace, label_selector=f"{c.LABEL_JOB}={job}",
                                             _preload_content=False)
        items = json.loads(resp.data).get("items") or []
        return [p for p in items if any(ref.get("uid") == uid and ref.get("controller")
                                        for ref in p.get("metadata", {}).get("ownerReferences") or [])]

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        body = {"metadata": {"annotations": dict(annotations)}}
        try:
            self.core.patch_namespaced_pod(name, namespace, body, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:  # gone meanwhile: the next tick recreates it with the right values
                raise

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name,
                                                        propagation_policy="Background",
                                                        _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise
