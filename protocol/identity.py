"""Peer identity: one Ed25519 key per peer, and the peer id derived from its public key.

Key file: the private key in unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``), readable
by ``openssl pkey``. :meth:`Identity.load_or_create` creates it with mode ``0600`` atomically
(written to a temporary file in the same directory, fsynced, then hard-linked into place, so a
concurrent creator never overwrites another's key) and **refuses** to load a key file that
group or others can read or write: it raises :class:`KeyFilePermissionError` naming the
``chmod 600`` fix rather than silently changing the file.

Peer id: ``base32(sha256(raw public key)[:20])``, lowercase without padding: 32 characters of
``a-z2-7``. It is checked against the public key by every receiver
(:func:`check_peer_id`), so a peer cannot claim another's id.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BadSignature
from .limits import PUBLIC_KEY_BYTES, SIGNATURE_BYTES

__all__ = [
    "Identity",
    "KeyFilePermissionError",
    "check_peer_id",
    "peer_id_from_public_key",
    "verify",
]

_PEER_ID_HASH_BYTES = 20


class KeyFilePermissionError(PermissionError):
    """The identity key file can be read or written by users other than its owner."""


def peer_id_from_public_key(public_key: bytes) -> str:
    """The peer id of a raw 32-byte Ed25519 public key (see the module docstring)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    digest = hashlib.sha256(public_key).digest()[:_PEER_ID_HASH_BYTES]
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def check_peer_id(peer_id: str, public_key: bytes) -> None:
    """Raise :class:`BadSignature` unless ``peer_id`` is the id of ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise BadSignature(f"public key of {peer_id!r} has {len(public_key)} bytes, need {PUBLIC_KEY_BYTES}")
    if peer_id_from_public_key(public_key) != peer_id:
        raise BadSignature(f"peer id {peer_id!r} does not belong to the public key it came with")


def verify(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Check an Ed25519 ``signature`` of ``data``; raise :class:`BadSignature` if it does not verify."""
    if not signature:
        raise BadSignature("signature is missing")
    if len(signature) != SIGNATURE_BYTES:
        raise BadSignature(
            f"signature has {len(signature)} bytes, an Ed25519 signature has {SIGNATURE_BYTES}"
        )
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise BadSignature(f"public key has {len(public_key)} bytes, need {PUBLIC_KEY_BYTES}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError) as exc:
        raise BadSignature("signature does not verify") from exc


class Identity:
    """A peer's Ed25519 key pair. Create with :meth:`generate` or :meth:`load_or_create`."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity, kept only in memory."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Load a PEM key file; refuse one whose mode lets group or others in."""
        path = Path(path)
        mode = path.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFilePermissionError(
                f"identity key file {path} has mode {stat.S_IMODE(mode):04o}: other users may read it; "
                f"run `chmod 600 {path}` (or delete it to make a new identity)"
            )
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the identity at ``path``, creating it (mode 0600, atomically) if it does not exist."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(identity.private_pem())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp_name, path)  # never replaces: a concurrent creator's key wins
            except FileExistsError:
                return cls.load(path)
        finally:
            os.unlink(tmp_name)
        _fsync_dir(path.parent)
        return identity

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``data``."""
        return self._private_key.sign(data)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
