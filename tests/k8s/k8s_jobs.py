"""AresJob manifests for the operator tests, in a module of its own (not conftest) so that test
modules import it by a package-qualified name whichever directories pytest collects together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def example_job(name: str = "demo", **spec_changes: Any) -> dict:
    """examples/job.yaml under another name, with changes given as `devices__2__split=7`."""
    job = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
    job["metadata"]["name"] = name
    for path, value in spec_changes.items():
        node = job["spec"]
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return job


def device_status(status: dict, name: str) -> dict:
    """One device's entry of a job's status.devices (a list keyed by name)."""
    return next(entry for entry in status.get("devices") or [] if entry["name"] == name)
