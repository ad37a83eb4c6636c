"""Optional TLS for the gRPC channels: one self-signed certificate per swarm.

A swarm operator generates one certificate and key (:func:`generate_self_signed`, ECDSA P-256)
and hands both to every peer, like the swarm key. Each peer serves with them and trusts exactly
that certificate as its root. Peers dial each other by IP address, which is not in the
certificate, so clients verify the server against the swarm name instead: pass
:func:`channel_options` to the channel (``grpc.ssl_target_name_override``). With
``mutual=True`` the server also demands the swarm certificate from clients, which makes TLS an
admission check of its own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "SWARM_TLS_NAME",
    "TlsMaterial",
    "channel_credentials",
    "channel_options",
    "generate_self_signed",
    "server_credentials",
]

#: The name every swarm certificate is issued to and every client verifies.
SWARM_TLS_NAME = "lioncub-swarm"


@dataclass(frozen=True)
class TlsMaterial:
    """A swarm certificate and its private key, both PEM."""

    certificate_pem: bytes
    private_key_pem: bytes

    @classmethod
    def load(cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> TlsMaterial:
        return cls(Path(cert_path).read_bytes(), Path(key_path).read_bytes())

    def save(self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> None:
        """Write both files; the key file is created with mode 0600."""
        Path(cert_path).write_bytes(self.certificate_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(self.private_key_pem)


def generate_self_signed(
    name: str = SWARM_TLS_NAME,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    valid_days: int = 365,
) -> TlsMaterial:
    """A self-signed certificate for ``name`` (and ``hosts`` as DNS / IP alternative names)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    alt_names: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate peers whose clocks run behind
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return TlsMaterial(
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def server_credentials(material: TlsMaterial, *, mutual: bool = False) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``; ``mutual`` requires the swarm cert from clients."""
    return grpc.ssl_server_credentials(
        [(material.private_key_pem, material.certificate_pem)],
        root_certificates=material.certificate_pem if mutual else None,
        require_client_auth=mutual,
    )


def channel_credentials(material: TlsMaterial, *, mutual: bool = False) -> grpc.ChannelCredentials:
    """Credentials for ``grpc.aio.secure_channel``: trust the swarm cert (and present it if mutual)."""
    if mutual:
        return grpc.ssl_channel_credentials(
            root_certificates=material.certificate_pem,
            private_key=material.private_key_pem,
            certificate_chain=material.certificate_pem,
        )
    return grpc.ssl_channel_credentials(root_certificates=material.certificate_pem)


def channel_options(name: str = SWARM_TLS_NAME) -> list[tuple[str, str]]:
    """Channel options that verify the server as ``name`` whatever address was dialled."""
    return [("grpc.ssl_target_name_override", name)]
