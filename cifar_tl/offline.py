"""Offline without HF_HUB_OFFLINE=1 (a laptop on a train, a sandbox): the Hub client would retry every request
(17-47 s of warnings measured) before the local caches are used or an error comes. `hub_offline()` tells at
once, from a name lookup, that the Hub cannot be reached, and then runs the calls inside it in offline mode:
local caches only, as with HF_HUB_OFFLINE=1."""
from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from huggingface_hub import constants, is_offline_mode


def hub_resolves() -> bool:
    """Whether the Hub's host name resolves: a test for "no network" that waits on no retries."""
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


@contextmanager
def hub_offline() -> Iterator[None]:
    """Inside: huggingface_hub (timm, snapshot_download) and datasets in offline mode when the Hub is
    unreachable; unchanged when it resolves or offline mode is already on."""
    if is_offline_mode() or hub_resolves():
        yield
        return
    modules = [constants] + ([sys.modules["datasets"].config] if "datasets" in sys.modules else [])
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value
