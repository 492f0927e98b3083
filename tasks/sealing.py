"""Token sealing: Fernet ciphertext that only seal-key holders open, for a bounded time.

A sealed token is what travels in task results, broker messages and events.
Fernet authenticates the ciphertext and stamps it with the time of sealing, so
:meth:`Sealer.unseal` can refuse one older than the result TTL. Without an
explicit ``SFOX_TOKEN_SEAL_KEY`` the key is derived (HKDF-SHA256) from the
enterprise key: every worker able to mint can then also open, and nothing new
has to be distributed.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tasks._exceptions import ConfigurationError, SealError

__all__ = ["Sealer", "derive_seal_key"]

#: HKDF salt and info: fixed, so every worker derives the same key; versioned for rotation.
_HKDF_SALT = b"sfox-tokens/seal-key"
_HKDF_INFO = b"fernet v1"


def derive_seal_key(enterprise_key: str) -> str:
    """A Fernet key derived from the enterprise key (HKDF-SHA256)."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO).derive(
        enterprise_key.encode("utf-8")
    )
    return base64.urlsafe_b64encode(raw).decode("ascii")


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
        except (ValueError, TypeError):
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
        now = int(self._clock())
        return self._fernet.encrypt_at_time(token.encode("utf-8"), now).decode("ascii")

    def unseal(self, sealed: str) -> str:
        """The plaintext token; :class:`SealError` if too old or not sealed by our keys."""
        if not isinstance(sealed, str) or not sealed:
            raise SealError("a sealed token must be a non-empty string")
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
            raise SealError(
                "sealed token refused: not sealed under this seal key, or damaged "
                "(check SFOX_TOKEN_SEAL_KEY / the enterprise key match the minting worker's)"
            ) from None
        age = int(self._clock()) - sealed_at
        raise SealError(
            f"sealed token refused: sealed {age} s ago, older than SFOX_TOKEN_RESULT_TTL "
            f"({self.ttl} s); mint a new token"
        )
