"""metav1.Condition bookkeeping: one function sets a condition, the rest reads them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

Condition = dict[str, Any]


def set_condition(conditions: Sequence[Mapping[str, Any]], type_: str, status: bool | str, reason: str,
                  message: str, now: str, generation: Optional[int] = None) -> list[Condition]:
    """A new list with `type_` set; lastTransitionTime changes only when the status flips."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = find(conditions, type_)
    since = old["lastTransitionTime"] if old and old.get("status") == value else now
    new: Condition = {"type": type_, "status": value, "reason": reason, "message": message[:32768],
                      "lastTransitionTime": since}
    if generation is not None:
        new["observedGeneration"] = generation
    rest = [dict(cond) for cond in conditions if cond.get("type") != type_]
    return sorted(rest + [new], key=lambda cond: cond["type"])


def find(conditions: Sequence[Mapping[str, Any]], type_: str) -> Optional[Mapping[str, Any]]:
    return next((cond for cond in conditions if cond.get("type") == type_), None)


def is_true(conditions: Sequence[Mapping[str, Any]], type_: str) -> bool:
    cond = find(conditions, type_)
    return bool(cond and cond.get("status") == "True")
