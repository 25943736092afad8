"""The operator's only door to the Kubernetes API for children (kopf patches the job itself).

Plain dicts in and out (responses are parsed as JSON, never into client models), and every
create treats 409 AlreadyExists as success, so re-running any handler is harmless. Every
response is read, also one nobody needs (`_done`): its connection then goes back to the pool,
where an unread one is lost and the next call opens and handshakes a new one (11 ms a pod patch
against 4 ms on a 2-core control plane: a job of 1,000 devices makes 1,000 such calls at once).
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
from collections.abc import Mapping
from typing import Any, Optional

import kubernetes
from kubernetes.client.rest import ApiException

from ares_operator import constants as c
from ares_operator.builders import JobRef
from ares_operator.refusals import Refusal

Obj = dict[str, Any]
log = logging.getLogger(__name__)


def _done(resp: Any) -> None:
    """Read a response to its end, so that its connection is reused (see the module's docstring)."""
    resp.data  # noqa: B018 -- reading is the point


def load_config() -> None:
    """In a pod: its service account; elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class Refused(Exception):
    """The API server refused a call (RBAC, Pod Security, quota, ...): the job must say so."""

    def __init__(self, verb: str, obj: Mapping[str, Any], exc: ApiException):
        self.status, self.verb = exc.status, verb
        self.kind, self.name = obj.get("kind", "?"), obj.get("metadata", {}).get("name", "?")
        try:
            self.detail = json.loads(exc.body or "{}").get("message") or str(exc.reason)
        except (ValueError, AttributeError):
            self.detail = str(exc.reason)
        super().__init__(f"{verb} {self.kind} {self.name}: {self.detail}")

    @property
    def refusal(self) -> Refusal:
        return Refusal(status=self.status, verb=self.verb, kind=self.kind, name=self.name, detail=self.detail)


class QuotaShortfall(Exception):
    """The namespace's ResourceQuotas cannot hold the job's children together (quota.shortfalls)."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("; ".join(lines))


class NotOurs(Exception):
    """An object of the name we need exists, controlled by someone else (say, a deleted job of the
    same name whose children the garbage collector has not removed yet). It is never adopted."""


def controller_uid(obj: Mapping[str, Any]) -> Optional[str]:
    return next((ref.get("uid") for ref in obj.get("metadata", {}).get("ownerReferences") or []
                 if ref.get("controller")), None)


class Kube:
    def __init__(self, api: Optional[kubernetes.client.ApiClient] = None):
        self.api = api or kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def create(self, obj: Mapping[str, Any], dry_run: bool = False) -> bool:
        """True if created, False if it already existed *and is ours* (same controller uid).

        With `dry_run` the API server runs every check and admission plugin (RBAC, Pod Security)
        and stores nothing. Raises `Refused` for any other refusal and `NotOurs` for a namesake.
        """
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        create = {"Pod": self.core.create_namespaced_pod, "Service": self.core.create_namespaced_service,
                  "Secret": self.core.create_namespaced_secret,
                  "ConfigMap": self.core.create_namespaced_config_map}[kind]
        extra = {"dry_run": "All"} if dry_run else {}
        try:
            _done(create(ns, dict(obj), _preload_content=False, **extra))
        except ApiException as exc:
            if exc.status != 409:
                raise Refused("create", obj, exc) from exc
            existing = self.read(kind, ns, obj["metadata"]["name"])
            if existing is not None and controller_uid(existing) != controller_uid(obj):
                raise NotOurs(f"{kind} {obj['metadata']['name']} exists and belongs to another owner "
                              f"(uid {controller_uid(existing)}); waiting for it to go away") from exc
            return False
        return True

    def post_event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the job, as `kubectl describe` shows them. Ours, not kopf's posting
        (which filters by log level): a Normal event must reach the cluster as surely as a Warning."""
        meta = body.get("metadata", {})
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
            "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                               "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": c.EVENT_COMPONENT}, "reportingComponent": c.EVENT_COMPONENT,
            "reportingInstance": socket.gethostname(), "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            _done(self.core.create_namespaced_event(meta.get("namespace"), event, _preload_content=False))
        except ApiException as exc:  # an event is a courtesy: never let it stop a reconcile
            log.warning("could not post event %s on %s: %s", reason, meta.get("name"), exc.reason)

    def read(self, kind: str, namespace: str, name: str) -> Optional[Obj]:
        read = {"Pod": self.core.read_namespaced_pod, "Service": self.core.read_namespaced_service,
                "Secret": self.core.read_namespaced_secret,
                "ConfigMap": self.core.read_namespaced_config_map}[kind]
        try:
            return json.loads(read(name, namespace, _preload_content=False).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise Refused("get", {"kind": kind, "metadata": {"name": name}}, exc) from exc

    def read_secret(self, namespace: str, name: str) -> Optional[Obj]:
        return self.read("Secret", namespace, name)

    def list_pods(self, namespace: str, job: str, uid: str) -> list[Obj]:
        """The job's pods: selected by label, kept only if the job controls them."""
        resp = self.core.list_namespaced_pod(namespace, label_selector=f"{c.LABEL_JOB}={job}",
                                             _preload_content=False)
        items = json.loads(resp.data).get("items") or []
        return [p for p in items if any(ref.get("uid") == uid and ref.get("controller")
                                        for ref in p.get("metadata", {}).get("ownerReferences") or [])]

    def list_quotas(self, namespace: str) -> list[Obj]:
        resp = self.core.list_namespaced_resource_quota(namespace, _preload_content=False)
        return json.loads(resp.data).get("items") or []

    def delete_children(self, namespace: str, job: JobRef) -> list[str]:
        """Delete every child of the job that it controls: its pods (by label), its Service,
        ConfigMap and Secrets (by name; the operator may not list Secrets). Each is checked by
        owner uid and deleted with its own uid as precondition. Returns what was deleted."""
        gone: list[str] = []
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{c.LABEL_JOB}={job.name}",
                                             _preload_content=False)
        found = [p for p in json.loads(pods.data).get("items") or [] if controller_uid(p) == job.uid]
        for kind, name in (("Service", job.server_name), ("ConfigMap", job.config_name),
                           ("Secret", job.secret_name), ("Secret", job.tls_secret_name)):
            obj = self.read(kind, namespace, name)
            if obj is not None and controller_uid(obj) == job.uid:
                found.append({**obj, "kind": kind})
        deleters = {"Pod": self.core.delete_namespaced_pod, "Service": self.core.delete_namespaced_service,
                    "ConfigMap": self.core.delete_namespaced_config_map, "Secret": self.core.delete_namespaced_secret}
        for obj in found:
            kind, meta = obj.get("kind") or "Pod", obj["metadata"]
            try:
                _done(deleters[kind](meta["name"], namespace, body={"preconditions": {"uid": meta["uid"]}},
                                     _preload_content=False))
            except ApiException as exc:
                if exc.status not in (404, 409):
                    raise
            gone.append(f"{kind} {meta['name']}")
        return gone

    def list_jobs(self, namespace: Optional[str] = None) -> list[Obj]:
        """AresTrainingJobs of one namespace, or of all."""
        if namespace is None:
            resp = self.custom.list_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL, _preload_content=False)
        else:
            resp = self.custom.list_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL,
                                                             _preload_content=False)
        return json.loads(resp.data).get("items") or []

    def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        _done(self.custom.patch_namespaced_custom_object_status(c.GROUP, c.VERSION, namespace, c.PLURAL, name,
                                                                {"status": dict(status)}, _preload_content=False))

    def remove_finalizer(self, job: Mapping[str, Any], finalizer: str) -> None:
        """Drop one finalizer, guarded by the resourceVersion read (a JSON patch with a test)."""
        meta = job["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if finalizer not in finalizers:
            return
        index = finalizers.index(finalizer)
        ops = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
               {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
        _done(self.custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, meta["namespace"], c.PLURAL,
                                                         meta["name"], ops, _content_type="application/json-patch+json",
                                                         _preload_content=False))

    def delete_pod(self, namespace: str, name: str, uid: str = "") -> None:
        """Delete a pod; with `uid`, that pod only (a namesake that replaced it meanwhile stays)."""
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            _done(self.core.delete_namespaced_pod(name, namespace, body=body, _preload_content=False))
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone, or gone and replaced (precondition failed)
                raise

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        body = {"metadata": {"annotations": dict(annotations)}}
        try:
            _done(self.core.patch_namespaced_pod(name, namespace, body, _preload_content=False))
        except ApiException as exc:
            if exc.status != 404:  # gone meanwhile: the next tick recreates it with the right values
                raise

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            _done(self.custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name,
                                                              propagation_policy="Background",
                                                              _preload_content=False))
        except ApiException as exc:
            if exc.status != 404:
                raise
