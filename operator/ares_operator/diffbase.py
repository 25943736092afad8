"""kopf's copy of the last spec it handled, kept small: compressed above a few kilobytes.

kopf remembers the spec it last handled in an annotation of the job, to tell a change (our
`on.update` handler) from a status write. As plain JSON that annotation is a second copy of the
spec: at 1,000 devices about 60 KB more in a job object etcd stores whole, rewritten with every
spec change. Compressed (zlib, then base64) the same annotation is a few kilobytes: device
entries differ in little but their names. A small job's annotation stays the readable JSON kopf
writes itself, and either form is read back, so an operator upgraded under running jobs carries
on without handling any of them as new.

Whoever may edit a job may edit this annotation too: what does not decode, or would decompress
beyond `MAX_DECODED` bytes, is read as no annotation at all, and kopf then handles the job as
a job it has not seen (the operator's create handler is idempotent).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any, Optional

import kopf

COMPRESS_ABOVE = 4096       # bytes of JSON; below, the annotation is kopf's own plain JSON
MAX_DECODED = 4 << 20       # a spec is at most what the API server takes in one request (3 MiB)
PREFIX = "zlib+base64:"     # marks the compressed form (plain JSON starts with '{')


def encode(essence: Any) -> str:
    """The annotation's value: JSON as kopf writes it, compressed when it is long."""
    text = json.dumps(essence, separators=(",", ":"))
    if len(text) <= COMPRESS_ABOVE:
        return text + "\n"
    return PREFIX + base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def decode(value: Optional[str]) -> Optional[Any]:
    """What `encode` wrote (or kopf's plain JSON); None for a missing or unreadable value."""
    if value is None:
        return None
    try:
        if not value.startswith(PREFIX):
            return json.loads(value)
        packed = base64.b64decode(value[len(PREFIX):], validate=True)
        inflate = zlib.decompressobj()
        text = inflate.decompress(packed, MAX_DECODED)
        if inflate.unconsumed_tail or not inflate.eof:
            return None  # larger than any spec, or cut short
        return json.loads(text)
    except (ValueError, binascii.Error, zlib.error):
        return None


class CompressedDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff-base storage, with `encode`/`decode` for the value."""

    def fetch(self, *, body: kopf.Body) -> Optional[kopf.BodyEssence]:
        for full_key in self.make_keys(self.key, body=body):
            decoded = decode(body.metadata.annotations.get(full_key, None))
            if decoded is not None:
                return decoded
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        encoded = encode(essence)
        for full_key in self.make_keys(self.key, body=body):
            patch.metadata.annotations[full_key] = encoded
        self._store_marker(prefix=self.prefix, patch=patch, body=body)
