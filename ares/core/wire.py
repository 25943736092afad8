"""The binary tensor format that crosses the network, and its validation.

Why not pickle or `torch.load`: unpickling runs arbitrary code chosen by the sender (the
published prototype's remote-code-execution hole). A bundle here is inert data:

    magic   4 bytes   b"ARW1"
    hlen    4 bytes   little-endian uint32, length of the JSON header (at most 1 MiB)
    header  hlen      UTF-8 JSON: {"tensors": [{"name", "dtype", "shape"}, ...], "meta": {...}}
    data              each tensor's raw little-endian bytes, C order, in header order, no padding

`decode` checks everything before any tensor exists: magic, header size and schema, dtype
allow-list, rank and dimension limits, that the byte count matches the shapes exactly (a
truncated body or a header that lies about a shape is refused), the total size cap, and
that floating-point values are finite. Tensors are built zero-copy with `torch.frombuffer`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

MAGIC = b"ARW1"
MAX_HEADER = 1 << 20
MAX_RANK = 8
MAX_TENSORS = 4096    # a bundle of VGG5 or ResNet-18 weights holds well under 200
MAX_JSON_DEPTH = 32   # header nesting; the format itself needs 4
MAX_INT_DIGITS = 20   # a header integer fits in 64 bits; Python refuses > 4300 digits with a ValueError
DEFAULT_MAX_BYTES = 256 << 20
CHUNK = 256 << 10  # streamed body chunk: httpx copies large single bodies quadratically under HTTP/2

# The only dtypes that may arrive. Adding one is a deliberate decision, not a default.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int8": torch.int8,  # the 8-bit codec's values (ares.core.codec); their scale travels as float32
    "int64": torch.int64,
}
_NAMES = {v: k for k, v in DTYPES.items()}
FLOATS = (torch.float32, torch.float16)
CODECS = {"fp32": torch.float32, "fp16": torch.float16}


class WireError(ValueError):
    """A frame that must not be used: as such, one whose format is broken (bad magic, a header
    that is not the format's, a body of the wrong length). The kinds below say more; the server's
    HTTP edge answers each with its status (`ares.runtime.server.STATUS`)."""


class FrameTooLarge(WireError):
    """A body, or a tensor it declares, beyond the size cap."""


class Unacceptable(WireError):
    """A well-formed frame holding what may not be used: a number that is not finite or too
    long, a tensor of a name, dtype or shape the request does not take."""


class NonFinite(Unacceptable):
    """A floating-point tensor holding NaN or Inf: what a device whose side of the model has
    diverged sends."""


@dataclass
class Bundle:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _header(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    entries = []
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise WireError(f"tensor {name!r}: dtype {t.dtype} is not sendable; allowed: {sorted(DTYPES)}")
        entries.append({"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape)})
    return json.dumps({"tensors": entries, "meta": dict(meta)}, separators=(",", ":")).encode()


def encode_chunks(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
                  chunk: int = CHUNK) -> tuple[int, Iterator[bytes]]:
    """(total length, chunk iterator): for streaming request bodies with a Content-Length."""
    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = _header(prepared, meta or {})
    head = MAGIC + struct.pack("<I", len(header)) + header
    views = [memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"") for t in
             (p.reshape(-1) for p in prepared.values())]
    total = len(head) + sum(v.nbytes for v in views)

    def chunks() -> Iterator[bytes]:
        yield head
        for v in views:
            for start in range(0, v.nbytes, chunk):
                yield v[start:start + chunk]  # a view: no copy until the socket takes it

    return total, chunks()


def encode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    _, chunks = encode_chunks(tensors, meta)
    return b"".join(chunks)  # one copy into the reply body


def decode(body: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Bundle:
    """Validate a whole bundle, then build its tensors. Raises WireError with a clear message. The
    tensors share a writable body's memory (the server and the links pass a bytearray); a
    read-only one is copied once."""
    view = memoryview(body)
    if view.nbytes > max_bytes:
        raise FrameTooLarge(f"body of {view.nbytes} bytes exceeds the {max_bytes}-byte limit")
    if view.nbytes < 8 or bytes(view[:4]) != MAGIC:
        raise WireError("not an ARES tensor bundle (bad magic or shorter than 8 bytes)")
    (hlen,) = struct.unpack("<I", view[4:8])
    if hlen > MAX_HEADER or 8 + hlen > view.nbytes:
        raise WireError(f"header length {hlen} is larger than the limit or the body (truncated?)")
    header = parse_json(bytes(view[8:8 + hlen]), "header")
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise WireError("header must be an object with a 'tensors' list")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("header 'meta' must be an object")

    if len(header["tensors"]) > MAX_TENSORS:
        raise WireError(f"header lists {len(header['tensors'])} tensors; at most {MAX_TENSORS} are allowed")
    specs = []
    seen: set[str] = set()  # a set, not a scan of `specs`: the check stays linear in the header
    offset = 8 + hlen
    for i, entry in enumerate(header["tensors"]):
        name, dtype, shape = _check_entry(i, entry)
        if name in seen:
            raise WireError(f"tensor name {name!r} appears twice")
        seen.add(name)
        # Dimensions must fit the cap even where another one is 0: torch computes strides from
        # every dimension, and [0, 2**31-1, 2**31-1, ...] overflows them.
        if math.prod(max(d, 1) for d in shape) * DTYPES[dtype].itemsize > max_bytes:
            raise FrameTooLarge(f"tensor {name!r}: shape {shape} is larger than the {max_bytes}-byte limit")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        specs.append((name, dtype, shape, offset, nbytes))
        offset += nbytes
    if offset != view.nbytes:
        raise WireError(f"header describes {offset} bytes but the body has {view.nbytes} "
                        "(truncated body or a header that lies about a shape)")

    if view.readonly:  # tensors alias the body: never a `bytes` object, which Python takes as immutable
        view = memoryview(bytearray(view))
    tensors = {}
    for name, dtype, shape, start, nbytes in specs:
        if nbytes == 0:
            t = torch.empty(shape, dtype=DTYPES[dtype])
        else:
            t = torch.frombuffer(view[start:start + nbytes], dtype=DTYPES[dtype]).reshape(shape)
        if t.is_floating_point() and not _all_finite(t):
            raise NonFinite(f"tensor {name!r} contains NaN or Inf")
        tensors[name] = t
    return Bundle(tensors, meta)


def _all_finite(t: torch.Tensor) -> bool:
    """A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum proves every value finite:
    one reduction instead of a bool tensor as large as `t` (30x faster on a 3 MB gradient). Only
    a sum that overflows from finite values needs the exact check."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def _refuse_constant(name: str) -> Any:
    raise Unacceptable(f"JSON constant {name} is not allowed (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Unacceptable(f"JSON number {text[:40]} is not finite in float64")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise Unacceptable(f"JSON integer with {len(text)} digits; at most {MAX_INT_DIGITS} are allowed")
    return int(text)


_SPECIAL = re.compile(rb'[\[\]{}"\\]')  # one character class: no backtracking


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { outside strings, in one linear pass and without recursion."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be too deep: skip the scan
    depth = deepest = 0
    in_string = False
    skip = -1  # position of a character escaped by a backslash
    for m in _SPECIAL.finditer(raw):
        pos, ch = m.start(), m.group()
        if pos == skip:
            continue
        if in_string:
            if ch == b"\\":
                skip = pos + 1
            elif ch == b'"':
                in_string = False
        elif ch == b'"':
            in_string = True
        elif ch in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
        elif ch in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_json(raw: bytes, what: str = "body", invalid: type[WireError] = WireError) -> Any:
    """Strict JSON for anything a device sends: bounded nesting, integers of at most 20 digits,
    finite numbers only (no NaN, Infinity or 1e999). Every failure is a WireError; text that is
    not JSON at all raises `invalid` (a frame's header: broken format; a JSON body: unacceptable)."""
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise WireError(f"{what} JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"invalid {what}: not valid JSON: {exc}") from None
    except RecursionError:  # not reachable after the depth check; kept as a last guard
        raise WireError(f"{what} JSON is nested too deeply") from None


def _check_entry(i: int, entry: Any) -> tuple[str, str, list[int]]:
    if not isinstance(entry, dict):
        raise WireError(f"tensor entry {i} is not an object")
    name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise WireError(f"tensor entry {i}: name must be a non-empty string")
    if dtype not in DTYPES:
        raise WireError(f"tensor {name!r}: dtype {dtype!r} not allowed; allowed: {sorted(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise WireError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative ints")
    return name, dtype, shape


def expect(bundle: Bundle, names: Mapping[str, tuple[torch.dtype | tuple[torch.dtype, ...], tuple[int | None, ...] | None]]) -> None:
    """Check that a bundle holds exactly these tensors, dtypes and shapes (None = any size / any shape)."""
    if set(bundle.tensors) != set(names):
        missing, extra = sorted(set(names) - set(bundle.tensors)), sorted(set(bundle.tensors) - set(names))
        raise Unacceptable(f"unexpected tensors: missing {missing}, not expected {extra}")
    for name, (dtypes, shape) in names.items():
        t = bundle.tensors[name]
        allowed = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if t.dtype not in allowed:
            raise Unacceptable(f"tensor {name!r} has dtype {_NAMES[t.dtype]}, expected one of "
                               f"{[_NAMES[d] for d in allowed]}")
        if shape is not None and (len(t.shape) != len(shape)
                                  or any(w is not None and w != g for w, g in zip(shape, t.shape))):
            want = ["*" if w is None else w for w in shape]
            raise Unacceptable(f"tensor {name!r} has shape {list(t.shape)}, expected {want}")


def to_codec(t: torch.Tensor, codec: str) -> torch.Tensor:
    """Activations and gradients may travel as fp16 (half the bytes, ~2e-4 relative error)."""
    return t.detach().to(CODECS[codec]) if t.is_floating_point() else t


def from_codec(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype == torch.float16 else t
