"""Serve stage: the listening socket, bound before the model loads, and uvicorn running on it.

Binding first means a bad ``--host`` or ``--port``, or a port already in use, is one line and exit
status 2 before any model is read (uvicorn binding late reported them as its own log lines, after the
model had loaded, and exit status 3); the address printed is the one bound (``--port 0``: a free one).
``cnnkit serve``, ``cnnkit ui`` and ``python -m cnnkit.serve`` all listen through here.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from cnnkit.errors import ConfigError

MAX_PORT = 65535


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (not yet listening; uvicorn listens on it).

    Raises:
        ConfigError: a port out of 0-65535, a host that is not an address of this machine, or an
            address that cannot be bound (in use, not permitted), naming the option and the fix.
    """
    if not 0 <= port <= MAX_PORT:
        raise ConfigError(f"--port must be between 0 and {MAX_PORT} (0: a free one; TF Serving's REST port is "
                          f"8501). Received: port={port}")
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"Cannot listen on host {host!r} ({reason}): --host takes an address or name of this "
                          f"machine, such as 127.0.0.1 (this machine only) or 0.0.0.0 (every interface). "
                          f"Received: host={host}") from None
    # IPv4 first unless the host is written as IPv6: "localhost" resolves to ::1 first on many systems,
    # and clients that try 127.0.0.1 would find nothing there ("" and 0.0.0.0: every IPv4 interface).
    found.sort(key=lambda info: info[0] != socket.AF_INET or ":" in host)
    family, kind, proto, _, address = found[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"Cannot listen on host {host!r} ({exc.strerror}): it is not an address of this machine; "
                              "--host takes one, such as 127.0.0.1 (this machine only) or 0.0.0.0 (every interface). "
                              f"Received: host={host}") from None
        raise ConfigError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}): stop what uses it, or pick "
                          f"another --port (0: a free one). Received: host={host}, port={port}") from None
    return sock


def url(host: str, sock: socket.socket) -> str:
    """``http://host:port/`` with the port actually bound (the one the system chose for port 0)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{sock.getsockname()[1]}/"


def run(app: Any, sock: socket.socket, log_level: str = "info",
        on_ready: Callable[[], None] | None = None) -> None:
    """Run ``app`` with uvicorn on ``sock`` until Ctrl-C; ``on_ready()`` once it accepts connections."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started and on_ready is not None:
            on_ready()

    if on_ready is not None:
        threading.Thread(target=announce, daemon=True).start()
    with sock:
        server.run(sockets=[sock])
