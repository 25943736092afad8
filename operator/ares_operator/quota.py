"""Pure: does the namespace's ResourceQuota hold the whole job, before anything is created?

The API server checks a quota one object at a time, so a job whose pods fit one by one but
not together would be half-created (the server and some devices running, holding the quota,
the rest refused). The operator sums what the job's missing children ask for and compares it
with each quota's `hard - used` first.

Quotas with scopes or a scopeSelector apply to some pods only; they are left to the API
server (a refusal there is still reported as QuotaExceeded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

Obj = Mapping[str, Any]

_SUFFIX = {"": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
           "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
           "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
           "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
           "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}
_STANDARD = ("cpu", "memory", "ephemeral-storage")


def parse_quantity(value: Any) -> Optional[Decimal]:
    """A Kubernetes quantity ("500m", "2Gi", 2, "1e3") as a Decimal; None if unreadable."""
    text = str(value).strip()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number, scale = text[: -len(suffix)], _SUFFIX[suffix]
            break
    else:
        number, scale = text, Decimal(1)
    try:
        parsed = Decimal(number) * scale
    except InvalidOperation:
        return None
    return parsed if parsed.is_finite() else None


def pod_demand(pod: Obj) -> dict[str, Decimal]:
    """What one pod counts against a quota: `requests.X`/`X` and `limits.X` per resource.

    As the scheduler counts it: app containers plus native sidecars (init containers with
    restartPolicy Always) run together; a regular init container runs alone beside the
    sidecars started before it; the pod needs the larger of the two.
    """
    spec = pod.get("spec") or {}
    out: dict[str, Decimal] = {}
    for kind in ("requests", "limits"):
        running: dict[str, Decimal] = {}
        peak: dict[str, Decimal] = {}
        sidecars: dict[str, Decimal] = {}
        for init in spec.get("initContainers") or []:
            amounts = _amounts(init, kind)
            if init.get("restartPolicy") == "Always":
                sidecars = _add(sidecars, amounts)
            else:
                peak = _max(peak, _add(sidecars, amounts))
        for container in spec.get("containers") or []:
            running = _add(running, _amounts(container, kind))
        for name, amount in _max(peak, _add(running, sidecars)).items():
            out[f"{kind}.{name}"] = amount
            if kind == "requests" and name in _STANDARD:
                out[name] = amount  # `cpu` in a quota means requests.cpu
    return out


def job_demand(pods: Sequence[Obj], others: Mapping[str, int]) -> dict[str, Decimal]:
    """The sum over the pods still to create, plus object counts (`pods`, `count/secrets`, ...)."""
    total: dict[str, Decimal] = {}
    for pod in pods:
        total = _add(total, pod_demand(pod))
    counts = {"pods": len(pods), **others}
    for kind, n in counts.items():
        if n:
            total[kind] = total.get(kind, Decimal(0)) + n
            total[f"count/{kind}"] = total.get(f"count/{kind}", Decimal(0)) + n
    return total


def shortfalls(quotas: Sequence[Obj], demand: Mapping[str, Decimal]) -> list[str]:
    """One line per quota resource the job would exceed: `quota q: requests.cpu needs 3, 1 of 2 left`."""
    lines: list[str] = []
    for quota in quotas:
        spec = quota.get("spec") or {}
        if spec.get("scopes") or spec.get("scopeSelector"):
            continue
        status = quota.get("status") or {}
        hard = status.get("hard") or spec.get("hard") or {}
        used = status.get("used") or {}
        name = (quota.get("metadata") or {}).get("name", "?")
        for resource, limit in sorted(hard.items()):
            need = demand.get(resource)
            if not need:
                continue
            cap, taken = parse_quantity(limit), parse_quantity(used.get(resource, 0)) or Decimal(0)
            if cap is not None and taken + need > cap:
                lines.append(f"ResourceQuota {name}: {resource} needs {_show(need)} more, "
                             f"{_show(max(cap - taken, Decimal(0)))} of {limit} left")
    return lines


def _amounts(container: Obj, kind: str) -> dict[str, Decimal]:
    given = ((container.get("resources") or {}).get(kind)) or {}
    return {name: q for name, value in given.items() if (q := parse_quantity(value)) is not None}


def _add(a: Mapping[str, Decimal], b: Mapping[str, Decimal]) -> dict[str, Decimal]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, Decimal(0)) + v
    return out


def _max(a: Mapping[str, Decimal], b: Mapping[str, Decimal]) -> dict[str, Decimal]:
    return {k: max(a.get(k, Decimal(0)), b.get(k, Decimal(0))) for k in {*a, *b}}


def _show(value: Decimal) -> str:
    return format(value.normalize(), "f")
