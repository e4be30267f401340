"""A throw-away certificate authority for trying the consortium on one machine.

A coordinator serves Flower's SuperLink over TLS; every institution's SuperNode
and the operator's ``flwr`` CLI verify its certificate against a CA they trust.
In production the CA belongs to the consortium (or a public PKI).  For a local
trial, :func:`make_local_ca` creates a fresh CA and a server certificate whose
SubjectAltName lists the host names and IP addresses the coordinator is reached
by (``127.0.0.1`` and ``localhost`` by default), because TLS clients match the
address they dial against the SAN, never against the subject's common name.

The CA's private key is used once to sign the server certificate and then
discarded: nothing can later issue certificates that the trial's clients would
trust.  To add a host, make a new CA (``overwrite=True``) and hand its
``ca.crt`` to the nodes again.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consortium.errors import ConfigError, param_error

logger = logging.getLogger(__name__)

CA_CERT_NAME = "ca.crt"
SERVER_CERT_NAME = "server.crt"
SERVER_KEY_NAME = "server.key"

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long before "now", so a peer whose clock is slightly
behind does not reject them as not yet valid."""


@dataclass(frozen=True)
class CertificatePaths:
    """Where :func:`make_local_ca` wrote the PEM files.

    Attributes
    ----------
    ca_cert : Path
        The CA certificate. Give it to every SuperNode (``--root-certificates``)
        and to the ``flwr`` CLI (``root-certificates``); it is not secret.
    server_cert : Path
        The coordinator's certificate, signed by the CA (``--ssl-certfile``).
    server_key : Path
        The coordinator's private key (``--ssl-keyfile``), mode 0600.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_directory(cls, directory: str | Path) -> CertificatePaths:
        """Return the paths :func:`make_local_ca` uses inside ``directory``."""
        directory = Path(directory)
        return cls(
            ca_cert=directory / CA_CERT_NAME,
            server_cert=directory / SERVER_CERT_NAME,
            server_key=directory / SERVER_KEY_NAME,
        )

    def check_exist(self) -> None:
        """Raise :class:`ConfigError` naming every file that is missing.

        Called before a coordinator starts, so a typo in a path is reported as
        such rather than as an opaque TLS failure inside Flower.
        """
        missing = [
            str(p) for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()
        ]
        if missing:
            raise ConfigError(
                f"TLS certificate file(s) not found: {', '.join(missing)}. "
                "Create them with `consortium certs DIR` or pass existing PEM files."
            )


def make_local_ca(
    directory: str | Path,
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
    overwrite: bool = False,
) -> CertificatePaths:
    """Create a CA and a server certificate for the given hosts.

    Both keys are ECDSA P-256. The server certificate carries a SubjectAltName
    with one entry per host (an ``IPAddress`` entry for IP literals, a
    ``DNSName`` entry otherwise), ``serverAuth`` extended key usage and an
    authority key identifier that chains it to the CA.

    Parameters
    ----------
    directory : str or Path
        Where to write ``ca.crt``, ``server.crt`` and ``server.key``; created
        if missing.
    hosts : sequence of str
        Host names and IP addresses (IPv4 or IPv6) the coordinator is reached by.
    days : int
        Validity of both certificates, in days.
    overwrite : bool
        Replace existing files. Without it, existing files are an error, so
        a CA that nodes already trust is never replaced by accident.

    Returns
    -------
    CertificatePaths
        The three files written.

    Raises
    ------
    ConfigError
        If ``hosts`` or ``days`` is invalid, or if a target file exists and
        ``overwrite`` is false.
    """
    owner = "make_local_ca"
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise param_error("days", owner, "an int >= 1", days)
    if isinstance(hosts, str) or not hosts:
        raise param_error(
            "hosts", owner, "a non-empty sequence of host names or IP addresses", hosts
        )
    alt_names = [_subject_alt_name(host, owner) for host in hosts]

    paths = CertificatePaths.in_directory(directory)
    existing = [str(p) for p in (paths.ca_cert, paths.server_cert, paths.server_key) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"Refusing to overwrite existing certificate file(s): {', '.join(existing)}. "
            "Nodes may already trust this CA; pass overwrite=True (CLI: --overwrite) "
            "to replace it, or choose another directory."
        )
    Path(directory).mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)
    not_before = now - _CLOCK_SKEW
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "consortium local trial"),
            x509.NameAttribute(NameOID.COMMON_NAME, "consortium local CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "consortium local trial"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    _write_file(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write_file(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write_file(
        paths.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    logger.info(
        "Wrote local CA %s and server certificate for %s to %s",
        paths.ca_cert.name,
        ", ".join(hosts),
        Path(directory),
    )
    return paths


def _subject_alt_name(host: object, owner: str) -> x509.GeneralName:
    """Turn one host into an ``IPAddress`` or ``DNSName`` SAN entry."""
    if not isinstance(host, str) or not host:
        raise param_error("hosts", owner, "host names or IP addresses (non-empty str)", host)
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise param_error("hosts", owner, "host names or IP addresses", host)
    return x509.DNSName(host)


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` so that it never exists with a wider mode.

    The file is created with ``mode`` from the start (a private key is never
    briefly world-readable), replacing any previous file.
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed the mode given to os.open
