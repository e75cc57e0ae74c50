"""Running the app under uvicorn: the port opens only once the caller's start-up (warm-up)
is done, and SIGTERM or Ctrl-C drains the requests in flight before the process exits 0.

uvicorn catches SIGTERM and SIGINT, stops accepting connections, waits for the requests in
flight (at most `drain_timeout_s`), then raises the signal again under the handlers it
found; the do-nothing handlers installed here let the process then end normally.
"""

from __future__ import annotations

import signal
import socket
import threading
from typing import Any, Callable

import uvicorn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def bind(host: str, port: int) -> socket.socket:
  """A listening TCP socket on host:port (port 0: a free one); OSError if it cannot be."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError:
    sock.close()
    raise
  sock.set_inheritable(True)
  return sock


def run(
  app: Any,
  sock: socket.socket,
  drain_timeout_s: float = 60.0,
  max_connections: int | None = None,
  on_stop: Callable[[], None] = lambda: None,
) -> None:
  """Serves `app` on the bound `sock` until SIGTERM / SIGINT, then drains and returns;
  `on_stop()` runs after the last request (the batchers' shutdown)."""
  config = uvicorn.Config(
    app,
    log_level="warning",
    access_log=False,
    lifespan="off",
    timeout_graceful_shutdown=drain_timeout_s,
    limit_concurrency=max_connections,
  )
  server = uvicorn.Server(config)
  main = threading.current_thread() is threading.main_thread()  # signals: the main thread's
  previous = {s: signal.signal(s, lambda *_: None) for s in STOP_SIGNALS} if main else {}
  try:
    server.run(sockets=[sock])
  finally:
    on_stop()
    for s, handler in previous.items():
      signal.signal(s, handler)
