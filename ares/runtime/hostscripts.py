"""Find the host scripts (ares-shape, ares-unshape, ares-power).

The sidecar, the network-namespace testbed and a person at a shell must all run
the SAME scripts, so Python never re-implements them; it only locates them:
``$ARES_HOSTSCRIPTS`` first, then the ``hostscripts/`` folder of a source
checkout, then ``$PATH`` (images install them in /usr/local/bin).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Scripts this module knows how to find.
SCRIPTS = ("ares-shape", "ares-unshape", "ares-power")

_CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "hostscripts"


class HostScriptNotFound(FileNotFoundError):
    """A host script is neither in $ARES_HOSTSCRIPTS, the checkout, nor on PATH."""


def hostscript(name: str) -> Path:
    """Absolute path of the executable host script ``name``."""
    if name not in SCRIPTS:
        raise ValueError(f"unknown host script {name!r}; known: {', '.join(SCRIPTS)}")
    dirs = [Path(d) for d in (os.environ.get("ARES_HOSTSCRIPTS"),) if d] + [_CHECKOUT_DIR]
    for folder in dirs:
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise HostScriptNotFound(
        f"{name} not found in $ARES_HOSTSCRIPTS, {_CHECKOUT_DIR} or PATH; "
        "install hostscripts/ (e.g. into /usr/local/bin)"
    )
