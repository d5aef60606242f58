"""Bearer-token access to the API: one shared token, compared in constant time."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# auto_error=False: a missing header is answered here, with the same 401 as a wrong token.
bearer = HTTPBearer(auto_error=False, description="the token given to `ichscan serve --token`")


def token_dependency(token: str | None) -> Callable[..., None]:
    """A dependency that lets every request through when ``token`` is None, else only
    those with ``Authorization: Bearer <token>``."""
    expected = token.encode() if token else None

    def require_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if expected is None:
            return
        given = credentials.credentials.encode() if credentials else b""
        if not secrets.compare_digest(given, expected):
            raise HTTPException(
                401,
                "missing or wrong token: send Authorization: Bearer TOKEN",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token
