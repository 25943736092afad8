"""Private certificates for one training job: a CA, and certificates it signs.

Pure: no networking, no files, no Kubernetes; everything is PEM bytes in and out. The operator
makes one `Authority` per job, signs the server's certificate for the Service's DNS names and
(optionally) one client certificate per device, stores the certificates and the leaf keys in
the job's Secret and forgets the CA's key: nothing can be signed for that CA afterwards, and
rotating means making a new Secret (new CA, new certificates). `ares run --tls` does the same
in a temporary directory.

Keys are EC P-256: generated in milliseconds, cheap handshakes on a Raspberry Pi, and
accepted by every TLS stack the devices use (OpenSSL in CPython, rustls in granian).
"""

from __future__ import annotations

import datetime
import math
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MIN_LIFETIME = datetime.timedelta(days=365)
MAX_LIFETIME = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(minutes=5)  # not-before is backdated: node clocks differ a little


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def _now(now: Optional[datetime.datetime]) -> datetime.datetime:
    return now or datetime.datetime.now(datetime.timezone.utc)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def lifetime_for(job_deadline_s: float) -> datetime.timedelta:
    """Certificates outlive the job: twice its worst-case duration, at least a year, at most ten."""
    seconds = 2 * job_deadline_s if math.isfinite(job_deadline_s) else MAX_LIFETIME.total_seconds()
    wanted = datetime.timedelta(seconds=min(max(seconds, 0.0), MAX_LIFETIME.total_seconds()))
    return max(wanted, MIN_LIFETIME)


class Authority:
    """A fresh CA whose key lives only in this object (never serialised by this module)."""

    def __init__(self, common_name: str, lifetime: datetime.timedelta = MIN_LIFETIME,
                 now: Optional[datetime.datetime] = None):
        start = _now(now) - CLOCK_SKEW
        self.not_after = start + CLOCK_SKEW + lifetime
        self._key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ARES"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self._name = name
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def _issue(self, common_name: str, san: Sequence[x509.GeneralName], usage: x509.ObjectIdentifier,
               now: Optional[datetime.datetime]) -> CertKey:
        key = _key()
        start = _now(now) - CLOCK_SKEW
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ARES"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return CertKey(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def issue_server(self, dns_names: Sequence[str], ip_addresses: Sequence[str] = (),
                     now: Optional[datetime.datetime] = None) -> CertKey:
        """A server certificate valid for these DNS names and IP addresses (at least one of them)."""
        if not dns_names and not ip_addresses:
            raise ValueError("a server certificate needs at least one DNS name or IP address")
        san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        san += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        return self._issue(dns_names[0] if dns_names else ip_addresses[0], san, ExtendedKeyUsageOID.SERVER_AUTH, now)

    def issue_client(self, name: str, now: Optional[datetime.datetime] = None) -> CertKey:
        """A client certificate whose name (CN and a DNS SAN) is `name`, e.g. a device's name."""
        return self._issue(name, [x509.DNSName(name)], ExtendedKeyUsageOID.CLIENT_AUTH, now)


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says, for tests, logs and expiry checks."""

    common_name: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    issuer: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    is_ca: bool


def inspect(cert_pem: bytes) -> CertInfo:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertInfo(common_name=str(cn[0].value) if cn else "", dns_names=dns, ip_addresses=ips,
                    issuer=str(issuer[0].value) if issuer else "",
                    not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, is_ca=is_ca)
