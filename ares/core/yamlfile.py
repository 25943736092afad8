"""YAML reading with libyaml's C parser where PyYAML has it.

`yaml.safe_load` always runs PyYAML's pure-Python parser: on a 10,000-device fleet file that is
most of `ares optimise`'s time (see README, Performance). `CSafeLoader` accepts the same safe
subset (no Python objects are built) about ten times faster; PyYAML wheels ship it, and a
PyYAML built without libyaml falls back to `SafeLoader`.
"""

from __future__ import annotations

from typing import Any

import yaml

SAFE_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str) -> Any:
    """`yaml.safe_load(text)`, through the C parser when available; errors are `yaml.YAMLError`."""
    return yaml.load(text, Loader=SAFE_LOADER)  # noqa: S506 - a safe loader, C or Python
