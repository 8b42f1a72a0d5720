"""Ephemeral client secrets: short-lived keys a backend mints so a browser never holds the API key.

A secret is self-contained: ``ek_<expiry>_<nonce>_<tag>``, where ``tag`` is an HMAC-SHA256
of ``<expiry>_<nonce>`` under a signing key. Checking one needs no table, so memory does not
grow with the number minted, a server restart does not revoke them early, and every replica
that shares the signing key (the API key, when one is configured) accepts a secret any of
them minted, whichever replica the load balancer picks for the WebSocket.

A secret is valid until its expiry and cannot be revoked one by one; rotating the API key
revokes them all. Sessions already open when a secret expires keep running (as OpenAI's do).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

SECRET_PREFIX = "ek_"
MIN_TTL_S = 10  # the bounds OpenAI's API documents for expires_after.seconds
MAX_TTL_S = 7200
DEFAULT_TTL_S = 600
_NONCE_BYTES = 12
_TAG_HEX_CHARS = 32  # 128 bits of the HMAC: forging one is as hard as guessing a 128-bit key


@dataclass(frozen=True)
class MintedSecret:
    value: str
    expires_at_s: int = 0  # Unix time, whole seconds (the wire's ``expires_at``)


class ClientSecrets:
    """Mints and checks ephemeral secrets; thread-safe (no mutable state after construction)."""

    def __init__(self, signing_key: bytes | str | None = None) -> None:
        # Derived, never the API key itself: a tag then says nothing usable about the key.
        if signing_key is None:
            signing_key = secrets.token_bytes(32)  # no API key: secrets are valid in this process only
        if isinstance(signing_key, str):
            signing_key = signing_key.encode()
        self._key = hashlib.sha256(b"audio-interaction client secret v1\x00" + signing_key).digest()

    def mint(self, ttl_s: int = DEFAULT_TTL_S, now_s: float | None = None) -> MintedSecret:
        if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"a client secret lives {MIN_TTL_S} to {MAX_TTL_S} s, not {ttl_s}")
        now_s = time.time() if now_s is None else now_s
        expires_at_s = int(now_s) + int(ttl_s)
        body = f"{expires_at_s}_{secrets.token_urlsafe(_NONCE_BYTES)}"
        return MintedSecret(value=f"{SECRET_PREFIX}{body}_{self._tag(body)}", expires_at_s=expires_at_s)

    def is_valid(self, value: str | None, now_s: float | None = None) -> bool:
        expiry_s = self.signed_expiry(value)
        return expiry_s is not None and (time.time() if now_s is None else now_s) < expiry_s

    def expired_since(self, value: str | None, now_s: float | None = None) -> float | None:
        """Seconds since ``value`` expired, when it is a secret this key signed that has expired; else None (a
        valid secret, or anything that is not one of ours). Lets a refusal say "expired" rather than "wrong key"."""
        expiry_s = self.signed_expiry(value)
        now_s = time.time() if now_s is None else now_s
        return None if expiry_s is None or now_s < expiry_s else now_s - expiry_s

    def signed_expiry(self, value: str | None) -> int | None:
        """The expiry (Unix seconds) of a secret this key signed, expired or not; None for anything else."""
        if not value or not value.startswith(SECRET_PREFIX) or len(value) > 200:
            return None
        body, _, tag = value[len(SECRET_PREFIX):].rpartition("_")
        expiry_text, _, nonce = body.partition("_")
        if not expiry_text.isdigit() or not nonce:
            return None
        # Compared before the clock: how long a check takes must not depend on the expiry.
        if not hmac.compare_digest(tag.encode(), self._tag(body).encode()):
            return None
        return int(expiry_text)

    def _tag(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()[:_TAG_HEX_CHARS]
