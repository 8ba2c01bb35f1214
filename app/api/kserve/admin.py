"""Who may use the model repository extension (index, load, unload; compare Triton's
``--http-restricted-api`` and ``--grpc-restricted-protocol`` for its ``model-repository``
category): nobody unless ``REPOSITORY_API=true``; then callers bearing the administrators'
token, ``ADMIN_TOKEN`` or the contents of ``ADMIN_TOKEN_FILE`` (read once, at start-up), as
HTTP ``Authorization: Bearer <token>`` or gRPC metadata ``authorization: Bearer <token>``.

No credentials: 401 (``WWW-Authenticate: Bearer``; gRPC UNAUTHENTICATED); a wrong token or
the extension off: 403 (gRPC PERMISSION_DENIED). The token never appears in a message or log.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field

from app.api.errors import ApiError
from app.config import Settings
from app.errors import ConfigurationError

TOKEN = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: what an HTTP header and gRPC metadata carry as is
OFF = ("the model repository extension is off: REPOSITORY_API=true (with ADMIN_TOKEN or "
       "ADMIN_TOKEN_FILE) serves it to administrators")


@dataclass(frozen=True)
class AdminGate:
    token: bytes | None = field(repr=False)  # None: the extension is off

    @classmethod
    def from_settings(cls, settings: Settings) -> AdminGate:
        """Raises :class:`ConfigurationError` when the extension is on without a usable token."""
        if not settings.repository_api:
            return cls(None)
        return cls(configured_token(settings).encode())

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def check(self, authorization: str | None) -> None:
        """Raises the :class:`ApiError` (401 or 403) that refuses the caller, if any."""
        if self.token is None:
            raise ApiError(403, "repository_api_off", OFF)
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            raise ApiError(401, "unauthenticated", "the model repository extension is for administrators: "
                           "send their token as 'Authorization: Bearer <token>'",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.encode("latin-1", "replace"), self.token):
            raise ApiError(403, "forbidden", "the bearer token is not the administrators' token")


def configured_token(settings: Settings) -> str:
    """ADMIN_TOKEN, else ADMIN_TOKEN_FILE's contents (surrounding whitespace aside: a file written
    with echo ends in a newline)."""
    given, path = settings.admin_token, settings.admin_token_file
    if given is not None and path is not None:
        raise ConfigurationError("REPOSITORY_API=true: set one of ADMIN_TOKEN and ADMIN_TOKEN_FILE, not both")
    if path is not None:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"ADMIN_TOKEN_FILE {path}: cannot be read: {exc}") from None
        where = f"ADMIN_TOKEN_FILE {path}"
    else:
        token, where = (given.get_secret_value().strip() if given is not None else ""), "ADMIN_TOKEN"
    if not token:
        raise ConfigurationError("REPOSITORY_API=true needs the administrators' token: set ADMIN_TOKEN, "
                                 "or ADMIN_TOKEN_FILE to a file holding it (it is "
                                 + ("empty)" if given is not None or path is not None else "unset)"))
    if not TOKEN.match(token):
        raise ConfigurationError(f"{where}: the token must be visible ASCII characters without spaces "
                                 "(what an Authorization header carries)")
    return token
