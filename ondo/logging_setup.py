"""ondo's logger writes to stderr at INFO by default (the KV cache size, CUDA graph capture...);
ONDO_LOG_LEVEL=WARNING quiets it. Applications that configure logging themselves keep control."""
from __future__ import annotations

import logging
import os


def configure() -> logging.Logger:
    logger = logging.getLogger("ondo")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s ondo: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("ONDO_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger
