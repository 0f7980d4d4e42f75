"""Whether the Hugging Face hub can be reached, checked once and quickly, so that offline users get
a one-line error at once instead of minutes of retries."""

from __future__ import annotations

import functools
import os
import socket


@functools.lru_cache(maxsize=1)
def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        host = endpoint.split("://")[-1].split("/")[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
