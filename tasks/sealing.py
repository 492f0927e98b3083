"""Token sealing: authenticated ciphertext that only seal-key holders open, for a bounded time.

A sealed token is what travels in task results, broker messages and events. It
is AES-256-GCM (``cryptography``'s AEAD) under a key derived from each
configured seal key, and carries the time it was sealed as authenticated data,
so :meth:`Sealer.unseal` can refuse one older than the result TTL. The text is
``SEALED_PREFIX`` then URL-safe base64 of ``time (8 bytes) | nonce (12) |
ciphertext and tag``.

Sealed tokens of earlier releases are Fernet tokens under the same key; they
still open, for as long as the TTL lets any token live, so a worker upgraded
mid-run reads what an older one sealed. A seal costs about a fifth of a Fernet
encrypt, which builds fresh AES-CBC and HMAC contexts for every token.

The seal key is a Fernet key (URL-safe base64 of 32 bytes), as before. Without
an explicit ``SFOX_TOKEN_SEAL_KEY`` it is derived (HKDF-SHA256) from the
enterprise key: every worker able to mint can then also open, and nothing new
has to be distributed. Nonces are random: one key seals safely up to 2**32
tokens (over a century at 100,000 a night).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import time
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._exceptions import ConfigurationError, SealError

__all__ = ["SEALED_PREFIX", "Sealer", "derive_seal_key"]

#: HKDF salt and info: fixed, so every worker derives the same key; versioned for rotation.
_HKDF_SALT = b"sfox-tokens/seal-key"
_HKDF_INFO = b"fernet v1"
#: HKDF info for the AEAD key derived from each seal key.
_AEAD_INFO = b"aes-256-gcm v2"

#: Every sealed token starts with this text.
SEALED_PREFIX = "sfs2."
_STAMP = struct.Struct(">Q")
_NONCE = 12
#: Seconds a seal may lie in the future (clocks of two workers disagree), as Fernet allows.
_MAX_CLOCK_SKEW = 60


def derive_seal_key(enterprise_key: str) -> str:
    """A Fernet key derived from the enterprise key (HKDF-SHA256)."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO).derive(
        enterprise_key.encode("utf-8")
    )
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _aead(key: str) -> AESGCM:
    """The AES-256-GCM key of one seal key."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_AEAD_INFO)
    return AESGCM(hkdf.derive(base64.urlsafe_b64decode(key)))


class Sealer:
    """Seals and opens user auth tokens.

    The first key seals; every key opens, so a new key can be rolled out ahead
    of the old one's retirement (``SFOX_TOKEN_SEAL_KEY=new,old``).
    """

    def __init__(
        self, keys: Sequence[str], ttl: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        if not keys:
            raise ConfigurationError("no seal key: set SFOX_TOKEN_SEAL_KEY or the enterprise key")
        try:
            self._fernet = MultiFernet([Fernet(key) for key in keys])
            self._aeads = [_aead(key) for key in keys]
        except (ValueError, TypeError, binascii.Error):
            raise ConfigurationError(
                "SFOX_TOKEN_SEAL_KEY is not a Fernet key (URL-safe base64 of 32 bytes); "
                "make one with: python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'"
            ) from None
        self.ttl = ttl
        self._clock = clock

    @classmethod
    def for_keys(cls, seal_keys: Sequence[str], enterprise_key: str | None, ttl: int) -> Sealer:
        """The explicit seal keys if any, else the key derived from the enterprise key."""
        if seal_keys:
            return cls(seal_keys, ttl)
        if not enterprise_key:
            raise ConfigurationError(
                "cannot seal tokens: set SFOX_TOKEN_SEAL_KEY, or SFOX_ENTERPRISE_API_KEY "
                "to derive the seal key from"
            )
        return cls([derive_seal_key(enterprise_key)], ttl)

    def seal(self, token: str) -> str:
        """Opaque, authenticated ciphertext of ``token``, stamped with the time now."""
        stamp = _STAMP.pack(int(self._clock()))
        nonce = os.urandom(_NONCE)
        sealed = self._aeads[0].encrypt(nonce, token.encode("utf-8"), stamp)
        return SEALED_PREFIX + base64.urlsafe_b64encode(stamp + nonce + sealed).decode("ascii")

    def unseal(self, sealed: str) -> str:
        """The plaintext token; :class:`SealError` if too old or not sealed by our keys."""
        if not isinstance(sealed, str) or not sealed:
            raise SealError("a sealed token must be a non-empty string")
        if not sealed.startswith(SEALED_PREFIX):
            return self._unseal_fernet(sealed)
        try:
            data = base64.urlsafe_b64decode(sealed[len(SEALED_PREFIX) :])
        except (ValueError, binascii.Error):
            raise _not_ours() from None
        head, nonce = data[: _STAMP.size], data[_STAMP.size : _STAMP.size + _NONCE]
        body = data[_STAMP.size + _NONCE :]
        if len(head) != _STAMP.size or len(nonce) != _NONCE:
            raise _not_ours()
        for aead in self._aeads:
            try:
                plain = aead.decrypt(nonce, body, head)
            except InvalidTag:
                continue
            (sealed_at,) = _STAMP.unpack(head)
            now = int(self._clock())
            if sealed_at > now + _MAX_CLOCK_SKEW:
                raise _not_ours()
            if now - sealed_at > self.ttl:
                raise _too_old(now - sealed_at, self.ttl)
            try:
                return plain.decode("utf-8")
            except UnicodeError:
                raise _not_ours() from None
        raise _not_ours()

    def _unseal_fernet(self, sealed: str) -> str:
        """A token an earlier release sealed with Fernet."""
        data = sealed.encode("ascii", "replace")
        try:
            now = int(self._clock())
            return self._fernet.decrypt_at_time(data, self.ttl, now).decode("utf-8")
        except (InvalidToken, UnicodeError):
            pass
        # Tell "too old" apart from "not ours": the operator's fix differs.
        try:
            sealed_at = self._fernet.extract_timestamp(data)
        except InvalidToken:
            raise _not_ours() from None
        raise _too_old(int(self._clock()) - sealed_at, self.ttl)


def _not_ours() -> SealError:
    return SealError(
        "sealed token refused: not sealed under this seal key, or damaged "
        "(check SFOX_TOKEN_SEAL_KEY / the enterprise key match the minting worker's)"
    )


def _too_old(age: int, ttl: int) -> SealError:
    return SealError(
        f"sealed token refused: sealed {age} s ago, older than SFOX_TOKEN_RESULT_TTL "
        f"({ttl} s); mint a new token"
    )
