"""Optional API keys: ``Authorization: Bearer KEY`` on every /v1 route.

With no keys configured (``BUTD_API_KEYS`` empty) every request passes. Health and metrics
routes do not use this dependency and stay open (probes and scrapers carry no key).
"""

from __future__ import annotations

import hmac

from fastapi import Request

from butd.service.errors import UnauthorizedError


def _matches(candidate: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: raise ``UnauthorizedError`` unless the bearer key is configured."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("missing API key: send 'Authorization: Bearer KEY'")
    if not _matches(token.strip(), keys):
        raise UnauthorizedError("wrong API key")
