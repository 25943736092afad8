"""Pure: the operator's in-memory view of its pods, and when a tick may trust it over a LIST.

The handlers keep a kopf index of every pod the jobs control, fed by one watch on pods that
carry `ares.io/job` (filtered by the API server): a tick reads its job's pods from memory
instead of listing them, so a tick of a 1,000-device job makes no pod call at all while
nothing changes (a LIST of its pods is about 8 MB of JSON, 0.3-0.7 s on a 2-core control plane).

A watch lags the API a little. The one lag that would mislead a tick is the operator's own
writes: a pod it has just deleted still shown running (it would be replaced a second time, and
counted twice), one it has just created not shown yet (it would be created again: a harmless
409, but the status would say Missing), or an annotation it has just patched shown as it was
(patched again). So each tick remembers what it wrote (`PendingWrites`); the next tick trusts
the index only once the index shows all of it, and lists the pods instead until then. What
anyone else changes (the kubelet, a user deleting a pod) is seen a moment later, as a LIST at
the next tick would see it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

from ares_operator.reconcile import PodView

Key = tuple[str, str]  # (namespace, the uid of the job that controls the pod)


def key(namespace: str, job_uid: str) -> Key:
    return (namespace, job_uid)


def entry(pod: Mapping[str, Any]) -> dict[Key, PodView]:
    """What the index holds for one pod: its view under (namespace, controlling job's uid);
    nothing for a pod no job controls (a namesake, a leftover without an owner)."""
    meta = pod.get("metadata") or {}
    owner = next((ref.get("uid") for ref in meta.get("ownerReferences") or []
                  if ref.get("controller") and ref.get("uid")), None)
    if owner is None:
        return {}
    return {key(meta.get("namespace", ""), owner): PodView.of(pod)}


@dataclasses.dataclass(frozen=True)
class PendingWrites:
    """Pod writes of this operator the index has not shown yet."""

    created: frozenset[str] = frozenset()  # names of pods created; seen once a pod of that name
                                           # that is not one deleted here is in the index
    deleted: frozenset[str] = frozenset()  # uids of pods deleted; seen once the index shows them
                                           # terminating or gone
    annotated: frozenset[tuple[str, str, str]] = frozenset()  # (pod, key, value) patched; seen once
                                                              # the index shows the pod with it

    def __bool__(self) -> bool:
        return bool(self.created or self.deleted or self.annotated)

    def add(self, created: Iterable[str] = (), deleted: Iterable[str] = (),
            annotated: Iterable[tuple[str, str, str]] = ()) -> "PendingWrites":
        new = frozenset(annotated)
        replaced = {(name, k) for name, k, _ in new}  # a later value of an annotation is the one to see
        return PendingWrites(self.created | frozenset(created), self.deleted | frozenset(u for u in deleted if u),
                             frozenset(a for a in self.annotated if a[:2] not in replaced) | new)


def _shown(pods: Sequence[PodView], pending: PendingWrites) -> tuple[set[str], dict[str, PodView]]:
    """Names of the pods that are not ones deleted here, and those pods by name."""
    current = {p.name: p for p in pods if p.uid not in pending.deleted}
    return set(current), current


def unseen(pods: Sequence[PodView], pending: PendingWrites) -> PendingWrites:
    """What of `pending` the index's `pods` does not show yet; empty: the index is current."""
    live = {p.uid for p in pods if not p.terminating}
    names, current = _shown(pods, pending)
    return PendingWrites(frozenset(n for n in pending.created if n not in names),
                         frozenset(u for u in pending.deleted if u in live),
                         frozenset(a for a in pending.annotated
                                   if a[0] not in current or current[a[0]].annotations.get(a[1]) != a[2]))


def after_list(listed: Sequence[PodView], pending: PendingWrites) -> PendingWrites:
    """What is still worth waiting for once a LIST (the API's state now) was read: a pod created
    here and already gone again (deleted by someone, by its job's end), or an annotation someone
    changed since, may never reach the index as written; every deletion does, as a deletion."""
    names, current = _shown(listed, pending)
    return PendingWrites(frozenset(n for n in pending.created if n in names), pending.deleted,
                         frozenset(a for a in pending.annotated
                                   if a[0] in current and current[a[0]].annotations.get(a[1]) == a[2]))


def view(index: Optional[Mapping[Key, Iterable[PodView]]], namespace: str, job_uid: str) -> Optional[list[PodView]]:
    """The job's pods in the index (none yet: an empty list); None without an index."""
    if index is None:
        return None
    store = index.get(key(namespace, job_uid))
    if store is None:
        return []
    for _ in range(3):  # the index is updated on the operator's event loop, beside this thread
        try:
            return list(store)
        except RuntimeError:  # changed while copied: copy again
            continue
    return None
