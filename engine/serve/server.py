"""Running the app: the bind rule (loopback, or a token) and uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from pathlib import Path

from engine.errors import AtlasError, BadValueError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` opens nothing beyond this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


def check_bind(host: str, token: str | None) -> None:
    """A non-loopback address only with a token: anything reachable from elsewhere checks it."""
    if not is_loopback(host) and not token:
        raise BadValueError(
            f"binding {host} opens the server beyond this machine; give --token (or env ATLAS_TOKEN), "
            "which every request must then carry, or bind 127.0.0.1"
        )
    if token is not None and len(token) < 8:
        raise BadValueError("the token must be at least 8 characters")


_TOKEN_IN_QUERY = re.compile(r"(?i)([?&]token=)[^&#\s]*")


class RedactToken(logging.Filter):
    """Rewrites a ``token=`` query parameter to ``token=***`` in uvicorn's access-log lines (its
    record's arguments: client, method, path with query, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = _TOKEN_IN_QUERY.sub(r"\1***", record.msg)
        return True


def redact_access_log() -> None:
    """Keep tokens out of uvicorn's access log (`RedactToken`; added once)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactToken) for f in access.filters):
        access.addFilter(RedactToken())


def serve(store_dir: str | Path, *, db_url: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          token: str | None = None, log_level: str = "info", announce: Callable[[str], None] | None = None) -> None:
    """Check the bind rule, open the store and serve it until interrupted; ``announce`` receives a
    line saying where (``serving DIR at http://HOST:PORT/``) before the server starts."""
    check_bind(host, token)
    try:
        import uvicorn

        from engine.serve.app import create_app
    except ImportError as e:
        raise AtlasError(f"`atlas serve` needs the serve extra ({e.name} is missing): "
                         "pip install 'concept-atlas[serve]'") from None
    from engine.store.store import Store

    store = Store.open(store_dir, db_url=db_url)
    app = create_app(store, token=token, loopback_only=is_loopback(host))
    if announce is not None:
        shown = DEFAULT_HOST if host in ("0.0.0.0", "::") else host
        announce(f"serving {store_dir} at http://{shown}:{port}/" + ("  (token required)" if token else ""))
    redact_access_log()
    uvicorn.run(app, host=host, port=port, log_level=log_level)
