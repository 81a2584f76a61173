"""Encryption at rest: a random master key wrapped by a key that scrypt derives from the passphrase.

The master key is 64 bytes: the first 32 are the AES-256-GCM key for chunks and manifests, the last 32
key the BLAKE3 hash that names chunks, so chunk names say nothing about their content to someone
without the key.
"""

from __future__ import annotations

import os

from blake3 import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from hvbackup.errors import RepositoryCorruptError, RepositoryError

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
SCRYPT = {"n": 1 << 15, "r": 8, "p": 1}  # 32 MiB and about 0.1 s per unlock
# The config is checksummed, not authenticated: refuse parameters that would make an unlock hang.
SCRYPT_LIMITS = {"n": 1 << 20, "r": 32, "p": 16}


def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> AESGCM:
    key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))
    return AESGCM(key)


class Keys:
    """The unlocked master key: seals and opens payloads, names chunks."""

    def __init__(self, master: bytes):
        self._aead = AESGCM(master[:32])
        self.id_key = master[32:]

    @classmethod
    def create(cls, passphrase: str, binding: bytes) -> tuple["Keys", dict]:
        """New keys and the config's ``encryption`` parameters that unlock them with ``passphrase``."""
        master, salt, nonce = os.urandom(64), os.urandom(32), os.urandom(NONCE_SIZE)
        wrapped = nonce + _kek(passphrase, salt, **SCRYPT).encrypt(nonce, master, binding)
        params = {"cipher": "aes-256-gcm", "kdf": "scrypt", **SCRYPT, "salt": salt.hex(), "wrapped_key": wrapped.hex()}
        return cls(master), params

    @classmethod
    def unlock(cls, passphrase: str, params: dict, binding: bytes) -> "Keys":
        try:
            if params["cipher"] != "aes-256-gcm" or params["kdf"] != "scrypt":
                raise RepositoryError(f"unsupported encryption {params['cipher']}/{params['kdf']}")
            cost = {k: int(params[k]) for k in SCRYPT}
            salt, wrapped = bytes.fromhex(params["salt"]), bytes.fromhex(params["wrapped_key"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryCorruptError(f"config: bad encryption parameters ({exc})") from None
        if any(not 1 <= cost[k] <= SCRYPT_LIMITS[k] for k in cost) or len(wrapped) != 64 + OVERHEAD:
            raise RepositoryCorruptError("config: encryption parameters out of range")
        try:
            master = _kek(passphrase, salt, **cost).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], binding)
        except InvalidTag:
            raise RepositoryError("wrong passphrase") from None
        return cls(master)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return b"".join(self.seal_parts(plaintext, aad))

    def seal_parts(self, plaintext, aad: bytes) -> tuple[bytes, bytes]:
        """``seal`` as (nonce, ciphertext ‖ tag), for writing without joining them."""
        nonce = os.urandom(NONCE_SIZE)  # random 96-bit nonces: safe far beyond any repository's chunk count
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes, what: str) -> bytes:
        if len(sealed) < OVERHEAD:
            raise RepositoryCorruptError(f"{what}: encrypted payload too short")
        try:
            return self._aead.decrypt(bytes(sealed[:NONCE_SIZE]), bytes(sealed[NONCE_SIZE:]), aad)
        except InvalidTag:
            raise RepositoryCorruptError(f"{what}: authentication failed (damaged, or not from this repository)"
                                         ) from None


def chunk_name(data, keys: Keys | None) -> bytes:
    """BLAKE3 of the plaintext, keyed with the repository's ID key when the repository is encrypted."""
    return (blake3(data, key=keys.id_key) if keys else blake3(data)).digest()
