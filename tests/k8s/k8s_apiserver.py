"""kmock's KubernetesEmulator with what kopf and kubectl need, kept in one place.

As released (kmock 0.8) the emulator sets no uid/resourceVersion/generation (kopf's finalizer
patch then fails), errors on `GET /api/v1/namespaces`, serves lists without `kind`, says `/v1`
in core discovery, streams watches as octet-stream, renders no Tables (so `kubectl get` shows no
printer columns) and collects no garbage. `Apiserver` fixes each of these:

- objects: uid, resourceVersion, generation (bumped on spec changes), creationTimestamp,
  generateName; a main-resource patch ignores `status`, a `/status` patch touches only it;
  merge, strategic (treated as merge) and JSON patches; 409 on a duplicate create.
- custom resources: a created CRD registers its resource; objects are defaulted and validated
  against its openAPIV3Schema (jsonschema) and list-map keys (422 Invalid). CEL rules are not
  evaluated (the operator re-checks what they say).
- lists and watches: kind/apiVersion, label and field selectors, JSON watch streams that start
  with the current objects and never miss an event, `timeoutSeconds`.
- discovery for core v1, apiextensions and every CRD; namespaces; Tables for `kubectl get`
  (CRD printer columns, pod phase, age); deletion honours finalizers and then collects every
  object owned by the deleted one.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import re
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Optional

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
from kmock._internal import apps, dicts, k8s, rendering

Obj = dict[str, Any]

# plural -> (kind, namespaced, short names)
CORE = {
    "pods": ("Pod", True, ["po"]), "services": ("Service", True, ["svc"]), "secrets": ("Secret", True, []),
    "configmaps": ("ConfigMap", True, ["cm"]), "events": ("Event", True, ["ev"]),
    "nodes": ("Node", False, ["no"]), "namespaces": ("Namespace", False, ["ns"]),
}
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
KEEP_REQUESTS = 50  # recent requests kept for assertions (kmock.requests)
KEEP_EVENTS = 2000  # recent events kept for watches that resume from a resourceVersion
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


@attrs.define
class _Kind:
    kind: str
    namespaced: bool
    short: list[str]
    subresources: list[str]
    categories: list[str] = attrs.field(factory=list)
    singular: str = ""
    schema: Optional[Obj] = None
    columns: list[Obj] = attrs.field(factory=list)
    list_keys: dict[str, list[str]] = attrs.field(factory=dict)  # json pointer of a list -> its map keys


class Invalid(k8s.KubernetesError):
    pass


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class Apiserver(k8s.KubernetesEmulator):
    _kinds: dict[kmock.resource, _Kind] = attrs.field(factory=dict, init=False)
    _rv: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _last_rv: int = attrs.field(default=0, init=False)
    _events: list[tuple[int, kmock.resource, Obj]] = attrs.field(factory=list, init=False)  # for watch replay
    _subscribers: list[tuple[kmock.resource, asyncio.Queue]] = attrs.field(factory=list, init=False)
    _namespaces: set[str] = attrs.field(factory=lambda: {"default", "kube-system"}, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for plural, (kind, namespaced, short) in CORE.items():
            with_status = ["status"] if plural in ("pods", "services") else []
            self._kinds[kmock.resource("", "v1", plural)] = _Kind(kind, namespaced, short, with_status)
        self._kinds[CRDS] = _Kind("CustomResourceDefinition", False, ["crd"], ["status"])

    # --- entry points --------------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock cannot parse /api/v1/namespaces[/name]: serve namespaces before it tries.
        m = re.fullmatch(r"/api/v1/namespaces(?:/([^/]+))?", raw.path)
        if m:
            return await self._namespace_endpoint(raw, m.group(1))
        if raw.path.startswith("/openapi/"):
            return aiohttp.web.json_response(self._openapi(raw.path))
        return await super().__call__(raw)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # kmock matches each request against every request it ever recorded: keep only the
        # latest few, or a long test (a kubelet polling, kopf watching) slows to a crawl.
        del self._requests[:-KEEP_REQUESTS]
        for reaction in self._payloads:
            del reaction._requests[:-KEEP_REQUESTS]
        # Skip KubernetesEmulator._handle's state keeping: the _serve_* methods below own the state.
        return await apps.RawHandler._handle(self, request)

    async def _namespace_endpoint(self, raw: aiohttp.web.BaseRequest, name: Optional[str]) -> aiohttp.web.Response:
        def ns(n: str) -> Obj:
            return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}, "status": {"phase": "Active"}}
        if raw.method == "POST":
            body = await raw.json()
            self._namespaces.add(body["metadata"]["name"])
            return aiohttp.web.json_response(ns(body["metadata"]["name"]), status=201)
        if name is None:
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {},
                                              "items": [ns(n) for n in sorted(self._namespaces)]})
        if name in self._namespaces:
            return aiohttp.web.json_response(ns(name))
        return await self._render_error(k8s.KubernetesObjectNotFoundError())

    def _openapi(self, path: str) -> Obj:
        """kubectl's validation reads OpenAPI v3. Each group-version lists a PATCH per kind that
        accepts `fieldValidation`, so kubectl leaves field checks to the server (which validates
        custom resources against their schema) instead of asking for protobuf OpenAPI v2."""
        gvs: dict[str, list[tuple[kmock.resource, _Kind]]] = {}
        for res, info in self._kinds.items():
            gvs.setdefault(f"apis/{res.group}/{res.version}" if res.group else f"api/{res.version}", []).append((res, info))
        if path.rstrip("/") == "/openapi/v3":
            return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}"} for gv in sorted(gvs)}}
        paths = {}
        for res, info in gvs.get(path[len("/openapi/v3/"):], []):
            gvk = {"group": res.group, "version": res.version, "kind": info.kind}
            op = {"parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                  "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk}
            paths[f"/{path[len('/openapi/v3/'):]}/{res.plural}/{{name}}"] = {"patch": op}
        return {"openapi": "3.0.0", "info": {"title": "emulator", "version": "v1"}, "paths": paths,
                "components": {"schemas": {}}}

    # --- discovery -----------------------------------------------------------------------------

    async def _serve_api(self, request: rendering.Request) -> rendering.Payload:
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}

    def _groups(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for res in self._kinds:
            if res.group:
                out.setdefault(res.group, set()).add(res.version)
        return out

    def _group(self, group: str, versions: set[str]) -> Obj:
        vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in sorted(versions)]
        return {"name": group, "versions": vs, "preferredVersion": vs[0]}

    async def _serve_apis(self, request: rendering.Request) -> rendering.Payload:
        return {"apiVersion": "v1", "kind": "APIGroupList",
                "groups": [self._group(g, vs) for g, vs in sorted(self._groups().items())]}

    async def _serve_group(self, request: rendering.Request) -> rendering.Payload:
        group = request.resource.group
        if group not in self._groups():
            raise k8s.KubernetesResourceNotFoundError()
        return {"apiVersion": "v1", "kind": "APIGroup", **self._group(group, self._groups()[group])}

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        group, version = request.resource.group, request.resource.version
        kinds = {r: k for r, k in self._kinds.items() if r.group == group and r.version == version}
        if not kinds:
            raise k8s.KubernetesResourceNotFoundError()
        resources = []
        for res, info in sorted(kinds.items(), key=lambda kv: kv[0].plural):
            resources.append({"name": res.plural, "singularName": info.singular or info.kind.lower(),
                              "namespaced": info.namespaced, "kind": info.kind, "verbs": VERBS,
                              "shortNames": info.short, "categories": info.categories})
            resources += [{"name": f"{res.plural}/{sub}", "singularName": "", "namespaced": info.namespaced,
                           "kind": info.kind, "verbs": ["get", "patch", "update"]} for sub in info.subresources]
        gv = f"{group}/{version}" if group else version
        return {"apiVersion": "v1", "kind": "APIResourceList", "groupVersion": gv, "resources": resources}

    # --- reads ---------------------------------------------------------------------------------

    def _info(self, request: rendering.Request) -> _Kind:
        info = self._kinds.get(kmock.resource(request.resource))
        if info is None:
            raise k8s.KubernetesResourceNotFoundError()
        return info

    def _live(self, request: rendering.Request) -> list[Obj]:
        res = kmock.resource(request.resource)
        out = []
        for (r, ns, _), obj in self._objects.items():
            if r == res and not obj.deleted and (request.namespace is None or ns == request.namespace):
                if _selected(obj.raw, request.params):
                    out.append(obj.raw)
        return sorted(out, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request)
        async with self._lock:
            items = self._live(request)
            rv = str(self._rv_now())
        if _wants_table(request):
            return self._table(info, items, rv)
        api_version = _api_version(request)
        return {"apiVersion": api_version, "kind": f"{info.kind}List", "metadata": {"resourceVersion": rv},
                "items": [{"apiVersion": api_version, "kind": info.kind, **i} for i in items]}

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request)
        obj = self._get(request)
        if _wants_table(request):
            return self._table(info, [obj.raw], str(self._rv_now()))
        return obj.raw

    async def _serve_watch(self, request: rendering.Request) -> rendering.Payload:
        self._info(request)
        queue: asyncio.Queue = asyncio.Queue()
        res = kmock.resource(request.resource)
        since = request.params.get("resourceVersion") or "0"
        async with self._lock:  # snapshot and subscribe atomically: no event falls in between
            if since == "0":  # from now: the current objects first, as ADDED
                current = [{"type": "ADDED", "object": o} for o in self._live(request)]
            else:  # from a list's resourceVersion: replay what happened since (kubectl wait, kopf)
                current = [e for rv, r, e in self._events if r == res and rv > int(since)
                           and (request.namespace is None or e["object"]["metadata"].get("namespace") == request.namespace)
                           and _selected(e["object"], request.params)]
            self._subscribers.append((res, queue))
        return rendering.Response(headers={"Content-Type": "application/json"},
                                  payload=self._stream(request, res, current, queue))

    async def _stream(self, request: rendering.Request, res: kmock.resource, current: list[Obj],
                      queue: asyncio.Queue) -> AsyncIterator[Obj]:
        timeout = float(request.params.get("timeoutSeconds") or 3600)
        deadline = asyncio.get_running_loop().time() + timeout
        table = _wants_table(request)
        info = self._kinds[res]
        try:
            yield b""  # send the headers now, even if nothing happens for a while
            for event in current:
                yield self._watch_event(info, event, table)
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=left)
                except asyncio.TimeoutError:
                    return
                meta = event["object"]["metadata"]
                if request.namespace is not None and meta.get("namespace") != request.namespace:
                    continue
                if _selected(event["object"], request.params):
                    yield self._watch_event(info, event, table)
        finally:
            self._subscribers = [(r, q) for r, q in self._subscribers if q is not queue]

    def _watch_event(self, info: _Kind, event: Obj, table: bool) -> Obj:
        if not table:
            return event
        return {"type": event["type"], "object": self._table(info, [event["object"]], "")}

    def _publish(self, res: kmock.resource, type_: str, obj: Obj) -> None:
        event = {"type": type_, "object": copy.deepcopy(obj)}
        self._events.append((int(obj["metadata"].get("resourceVersion") or 0), res, event))
        del self._events[:-KEEP_EVENTS]
        for r, q in self._subscribers:
            if r == res:
                q.put_nowait(event)

    # --- writes --------------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self._last_rv = next(self._rv)
        return self._last_rv

    def _rv_now(self) -> int:
        return self._last_rv

    def _get(self, request: rendering.Request) -> kmock.Object:
        key = (kmock.resource(request.resource), request.namespace, request.name)
        obj = self._objects[key] if key in self._objects else None
        if obj is None or obj.deleted:
            raise k8s.KubernetesObjectNotFoundError()
        return obj

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request)
        res = kmock.resource(request.resource)
        body = copy.deepcopy(request.data or {})
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if info.namespaced:
            meta["namespace"] = request.namespace or meta.get("namespace") or "default"
        body.setdefault("apiVersion", _api_version(request))
        body.setdefault("kind", info.kind)
        async with self._lock:
            key = (res, meta.get("namespace") if info.namespaced else None, meta["name"])
            if key in self._objects and not self._objects[key].deleted:
                raise k8s.KubernetesObjectConflictError(
                    message=f'{res.plural} "{meta["name"]}" already exists', details={"name": meta["name"]})
            if "status" in info.subresources:
                body.pop("status", None)
            meta.update({"uid": str(uuid.uuid4()), "creationTimestamp": _now(), "generation": 1,
                         "resourceVersion": str(self._next_rv())})
            self._admit(info, body)
            if key in self._objects:
                self._objects[key].create(body)
            else:
                self._objects[key] = body
            if res == CRDS:
                self._register_crd(body)
            self._publish(res, "ADDED", body)
        return rendering.Response(status=201, payload=body)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request)
        res = kmock.resource(request.resource)
        async with self._lock:
            obj = self._get(request)
            old = copy.deepcopy(obj.raw)
            new = _apply_patch(old, request)
            if request.subresource == "status":
                new = {**old, "status": new.get("status")}
            elif "status" in info.subresources:
                new["status"] = old.get("status")
            new = {k: v for k, v in new.items() if v is not None}
            new["metadata"].update({k: old["metadata"][k] for k in ("uid", "creationTimestamp", "generation")
                                    if k in old["metadata"]})
            if {k: v for k, v in new.items() if k not in ("metadata", "status")} != \
                    {k: v for k, v in old.items() if k not in ("metadata", "status")}:
                new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
            if new == old:
                return old
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            self._admit(info, new)
            obj.patch(_replacement(obj.raw, new))
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                self._remove(res, request.namespace, request.name)
            else:
                self._publish(res, "MODIFIED", obj.raw)
        return new

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        res = kmock.resource(request.resource)
        async with self._lock:
            obj = self._get(request)
            raw = copy.deepcopy(obj.raw)
            if raw["metadata"].get("finalizers"):
                if not raw["metadata"].get("deletionTimestamp"):
                    obj.patch({"metadata": {"deletionTimestamp": _now(), "resourceVersion": str(self._next_rv())}})
                    self._publish(res, "MODIFIED", obj.raw)
                return obj.raw
            self._remove(res, request.namespace, request.name)
        return raw

    def _remove(self, res: kmock.resource, namespace: Optional[str], name: str) -> None:
        """Delete now, then collect what it owned (finalizers on dependents are honoured)."""
        obj = self._objects[(res, namespace, name)]
        raw = copy.deepcopy(obj.raw)
        raw["metadata"]["resourceVersion"] = str(self._next_rv())
        obj.delete()
        self._publish(res, "DELETED", raw)
        uid = raw["metadata"].get("uid")
        for (r, ns, n), other in list(self._objects.items()):
            if other.deleted or not any(ref.get("uid") == uid for ref in other.raw["metadata"].get("ownerReferences") or []):
                continue
            if other.raw["metadata"].get("finalizers"):
                other.patch({"metadata": {"deletionTimestamp": _now(), "resourceVersion": str(self._next_rv())}})
                self._publish(r, "MODIFIED", other.raw)
            else:
                self._remove(r, ns, n)

    # --- custom resources ----------------------------------------------------------------------

    def _register_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            res = kmock.resource(spec["group"], version["name"], names["plural"])
            self._kinds[res] = _Kind(
                kind=names["kind"], namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short=names.get("shortNames", []), categories=names.get("categories", []),
                singular=names.get("singular", ""), subresources=list(version.get("subresources") or {}),
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                columns=version.get("additionalPrinterColumns") or [],
                list_keys=_list_map_keys((version.get("schema") or {}).get("openAPIV3Schema") or {}, ""))

    def _admit(self, info: _Kind, obj: Obj) -> None:
        """Defaults, then the schema and list-map keys, as the real API server checks a CR."""
        if info.schema is None:
            return
        _default(info.schema, obj)
        errors = sorted(jsonschema.Draft4Validator(_plain_schema(info.schema)).iter_errors(obj), key=str)
        problems = [f"{'.'.join(str(p) for p in e.absolute_path)}: Invalid value: {e.message}" for e in errors]
        for pointer, keys in info.list_keys.items():
            items = _at(obj, pointer)
            seen = [tuple(i.get(k) for k in keys) for i in items or [] if isinstance(i, dict)]
            problems += [f"{pointer}: Duplicate value: {dict(zip(keys, d))}" for d in sorted(set(seen)) if seen.count(d) > 1]
        if problems:
            name = obj["metadata"].get("name")
            raise Invalid(status=422, reason="Invalid",
                          message=f'{info.kind} "{name}" is invalid: ' + "; ".join(problems),
                          details={"name": name, "kind": info.kind,
                                   "causes": [{"reason": "FieldValueInvalid", "message": p.split(": ", 1)[1],
                                               "field": p.split(": ", 1)[0]} for p in problems]})

    # --- tables --------------------------------------------------------------------------------

    def _table(self, info: _Kind, items: list[Obj], rv: str) -> Obj:
        cols = [{"name": "Name", "type": "string", "format": "name", "priority": 0, "description": "name"}]
        if info.columns:
            paths = [col["jsonPath"] for col in info.columns]
            cols += [{"name": col["name"], "type": col["type"], "format": col.get("format", ""),
                      "priority": col.get("priority", 0), "description": col.get("description", "")}
                     for col in info.columns]
        elif info.kind == "Pod":
            paths = [".status.phase", ".metadata.creationTimestamp"]
            cols += [{"name": "Status", "type": "string", "format": "", "priority": 0, "description": ""},
                     {"name": "Age", "type": "date", "format": "", "priority": 0, "description": ""}]
        else:
            paths = [".metadata.creationTimestamp"]
            cols += [{"name": "Age", "type": "date", "format": "", "priority": 0, "description": ""}]
        rows = []
        for obj in items:
            cells: list[Any] = [obj["metadata"]["name"]]
            for col, path in zip(cols[1:], paths):
                cells.append(_cell(col["type"], _json_path(obj, path)))
            partial = {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]}
            rows.append({"cells": cells, "object": partial})
        return {"apiVersion": "meta.k8s.io/v1", "kind": "Table", "metadata": {"resourceVersion": rv},
                "columnDefinitions": cols, "rows": rows}


# --- helpers (pure) --------------------------------------------------------------------------------

def _api_version(request: rendering.Request) -> str:
    res = request.resource
    return f"{res.group}/{res.version}" if res.group else res.version


def _wants_table(request: rendering.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _selected(obj: Obj, params: Mapping[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (params.get("labelSelector") or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term.strip() not in labels:
            return False
    for term in filter(None, (params.get("fieldSelector") or "").split(",")):
        k, v = term.replace("==", "=").split("=", 1)
        if str(_json_path(obj, "." + k)) != v:
            return False
    return True


def _apply_patch(old: Obj, request: rendering.Request) -> Obj:
    data = request.data
    if isinstance(data, list) or "json-patch" in request.headers.get("Content-Type", ""):
        try:
            return jsonpatch.apply_patch(old, data)
        except jsonpatch.JsonPatchTestFailed as exc:  # e.g. a stale resourceVersion: retry with a fresh one
            raise k8s.KubernetesError(status=409, reason="Conflict", message=str(exc)) from None
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise Invalid(status=422, reason="Invalid", message=str(exc)) from None
    return dicts.patch_dict(copy.deepcopy(old), data or {})


def _replacement(current: Obj, new: Obj) -> Obj:
    """A kmock merge patch that turns `current` into `new` (None removes a key)."""
    out: Obj = {}
    for k in set(current) | set(new):
        if k not in new:
            out[k] = None
        elif isinstance(new[k], dict) and isinstance(current.get(k), dict):
            out[k] = _replacement(current[k], new[k])
        elif current.get(k) != new[k]:
            out[k] = new[k]
    return out


def _json_path(obj: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _cell(type_: str, value: Any) -> Any:
    if value is None:
        return None
    if type_ == "date":  # as the real API server does for CRD columns: a human duration
        then = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        secs = int((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())
        return f"{secs}s" if secs < 120 else f"{secs // 60}m" if secs < 7200 else f"{secs // 3600}h"
    return value


def _plain_schema(schema: Any) -> Any:
    """OpenAPI v3 (structural) -> JSON schema draft 4: drop the x-kubernetes-* extensions."""
    if isinstance(schema, dict):
        return {k: _plain_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if isinstance(schema, list):
        return [_plain_schema(v) for v in schema]
    return schema


def _default(schema: Obj, obj: Any) -> None:
    if not isinstance(obj, dict):
        if isinstance(obj, list) and "items" in schema:
            for item in obj:
                _default(schema["items"], item)
        return
    for key, sub in (schema.get("properties") or {}).items():
        if key not in obj and "default" in sub:
            obj[key] = copy.deepcopy(sub["default"])
        if key in obj:
            _default(sub, obj[key])


def _list_map_keys(schema: Obj, pointer: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if schema.get("x-kubernetes-list-type") == "map":
        out[pointer] = schema.get("x-kubernetes-list-map-keys") or []
    for key, sub in (schema.get("properties") or {}).items():
        out.update(_list_map_keys(sub, f"{pointer}.{key}" if pointer else key))
    return out


def _at(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


class ApiserverThread:
    """The emulator on a free loopback port, served from its own thread and event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url = ""
        self.handler: Optional[Apiserver] = None
        self._stop: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),),
                                        name="apiserver", daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with Apiserver() as handler, kmock.Server(handler) as server:
            self.handler = handler
            self.url = str(server.url).rstrip("/")
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> "ApiserverThread":
        self._thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the API emulator did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
