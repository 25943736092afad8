"""Pure: why the API server refused one of the operator's calls, told the way a cluster user can act on.

The API server answers most refusals with 403 Forbidden, whoever refused: RBAC, Pod Security
admission, a missing RuntimeClass, a ResourceQuota, a LimitRange. Each becomes its own
condition reason here, with what was refused and how to fix it.
"""

from __future__ import annotations

import dataclasses

from ares_operator import constants as c


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What the API server said about one call (from `kube.Refused`)."""

    status: int
    verb: str
    kind: str
    name: str
    detail: str


def explain(refusal: Refusal, namespace: str) -> tuple[str, str]:
    """(condition reason, message) for a refused call in the job's namespace."""
    what = f"{refusal.kind} {refusal.name} in namespace {namespace}"
    detail = refusal.detail
    if refusal.status == 403 and "PodSecurity" in detail:
        return c.REASON_POD_SECURITY, (
            f"Pod Security refused {what}: {detail}. Device pods run the host-control sidecar, which needs "
            "NET_ADMIN to cap bandwidth with tc (and, on Jetson, privileged with the host's nvpmodel to switch "
            "power modes): label the namespace pod-security.kubernetes.io/enforce=privileged. "
            "Nothing was created for this job.")
    if "RuntimeClass" in detail and "not found" in detail:
        return c.REASON_RUNTIME_CLASS, (
            f"{what} names a RuntimeClass this cluster does not have: {detail}. Jetson device classes run with "
            f"runtimeClassName {c.JETSON_RUNTIME_CLASS} (the NVIDIA container runtime): install the NVIDIA container "
            "toolkit on the Jetson nodes and create that RuntimeClass, or give the device deviceClass cpu or "
            "raspberry-pi. Nothing was created for this job.")
    if "exceeded quota" in detail:
        return c.REASON_QUOTA, (
            f"a ResourceQuota refused {what}: {detail}. Lower the job's resources or ask for a larger quota.")
    if refusal.status == 403 and ("maximum" in detail or "minimum" in detail) and (
            "per Container" in detail or "per Pod" in detail):
        return c.REASON_LIMIT_RANGE, (
            f"a LimitRange refused {what}: {detail}. Change the job's resources to fit the namespace's LimitRange.")
    if refusal.status == 403:
        return c.REASON_FORBIDDEN, (
            f"the operator may not {refusal.verb} {what}: {detail}. Its ServiceAccount lacks this permission: "
            "install the chart's RBAC for this namespace (watchNamespaces) or add the rule.")
    if refusal.status == 422:
        return c.REASON_INVALID_CHILD, (
            f"the API server found {what} invalid: {detail}. Correct the job's spec (the fields named above).")
    return c.REASON_REFUSED, f"the API server refused to {refusal.verb} {what}: {detail}"
