"""The client side of TLS to the edge server: whom to trust, which name to check, what went wrong.

Devices and the operator's controller reach the server over HTTPS with ALPN h2, trusting only
the job's CA (`--ca`), never the system's store. The name checked is the URL's host unless
`server_name` says otherwise (the Service's DNS name while dialling an address, as `curl
--connect-to` does): it is both the SNI and the name the certificate must carry. A device
with a client certificate (mutual TLS) presents it on every connection.

A refused certificate is not a server that is still starting: `explain` turns the ssl error
buried in httpx's exception into one sentence, and callers stop instead of retrying.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from typing import Optional

import httpx


class TlsError(Exception):
    """The server could not be authenticated (wrong CA, wrong name, expired, not TLS at all)."""


@dataclass(frozen=True)
class ClientTls:
    ca_file: Optional[str] = None      # PEM file of the CA to trust (the job's)
    ca_pem: Optional[bytes] = None     # or the PEM itself (the operator reads it from the Secret)
    server_name: Optional[str] = None  # name to verify (and send as SNI); default: the URL's host
    cert_file: Optional[str] = None    # client certificate for mutual TLS
    key_file: Optional[str] = None

    def context(self) -> ssl.SSLContext:
        """Trust only the given CA (the system's store when none is given); TLS 1.2 at least."""
        if self.ca_file is None and self.ca_pem is None:
            ctx = ssl.create_default_context()
        else:
            ctx = ssl.create_default_context(cafile=self.ca_file,
                                             cadata=self.ca_pem.decode() if self.ca_pem else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class _ServerName(httpx.BaseTransport):
    """Verify (and send as SNI) a fixed name, whatever address the URL dials."""

    def __init__(self, inner: httpx.BaseTransport, name: str):
        self.inner, self.name = inner, name

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.extensions = {**request.extensions, "sni_hostname": self.name}
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@functools.cache
def system_trust() -> ssl.SSLContext:
    """The system's CA store, loaded once per process. httpx loads it for every transport it makes
    without one (~25 ms of CPU each): a controller polling the server's status, or a test polling
    /healthz, paid that on every request."""
    return httpx.create_ssl_context()


def transport(tls: Optional[ClientTls], http1: bool = True, http2: bool = False) -> httpx.BaseTransport:
    """An httpx transport: plain when `tls` is None (h2c or HTTP/1.1), else verifying as configured.
    HTTP/2 only (devices): our large-frame transport (h2client.py); otherwise httpx's own."""
    if http2 and not http1:
        from ares.runtime.h2client import H2Transport

        inner: httpx.BaseTransport = H2Transport(tls.context() if tls else None)
        return _ServerName(inner, tls.server_name) if tls and tls.server_name else inner
    if tls is None:  # (an https URL would still be verified, against the system's store)
        return httpx.HTTPTransport(http1=http1, http2=http2, verify=system_trust())
    inner = httpx.HTTPTransport(http1=http1, http2=http2, verify=tls.context())
    return _ServerName(inner, tls.server_name) if tls.server_name else inner


def explain(exc: BaseException) -> Optional[str]:
    """One sentence if `exc` (or what caused it) is a TLS failure; None for anything else."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {current.verify_message or current.reason}"
        if isinstance(current, ssl.SSLError):
            return f"TLS handshake failed: {current.reason or current}"
        current = current.__cause__ or current.__context__
    return None
