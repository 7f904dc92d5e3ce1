"""The Hugging Face Hub seen from a machine that may be offline: tell it in seconds, not after
the hub client's half minute of retries."""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub's host cannot be connected to, or None when it can (or cannot be told).

    Offline, the hub client retries each request for half a minute, printing every retry,
    before it fails (or falls back to its cache). One connection attempt tells the same in
    seconds. Behind a proxy (or with HF_HUB_OFFLINE set) the client knows better than a direct
    connection would: nothing is probed. HF_ENDPOINT names the host, as it does for the client.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if offline or any(os.environ.get(name) for name in _PROXIES):
        return None
    try:
        url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    except ValueError:  # a malformed HF_ENDPOINT: the client's own error says more
        return None
    if not host:
        return None
    # The name lookup has no timeout of its own (a resolver that does not answer takes its
    # retries' full length): it runs in a thread that is waited for as long as the connection.
    lookup = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        address = lookup.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM).result(timeout)[0][4]
        socket.create_connection(address[:2], timeout=timeout).close()
    except concurrent.futures.TimeoutError:
        return f"{host}:{port}: no answer within {timeout:g} s"
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    finally:
        lookup.shutdown(wait=False)
    return None


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """HF ``datasets`` and ``huggingface_hub`` read their caches only while the block runs, as
    with HF_HUB_OFFLINE=1: a cached dataset loads at once, a missing one fails at once. Both
    read the flag when called, from these module attributes; a version that reads it elsewhere
    just goes online as before."""
    modules = []
    for name in ("datasets.config", "huggingface_hub.constants"):
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(name))
    flags = [(m, m.HF_HUB_OFFLINE) for m in modules if hasattr(m, "HF_HUB_OFFLINE")]
    for module, _ in flags:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in flags:
            module.HF_HUB_OFFLINE = value
