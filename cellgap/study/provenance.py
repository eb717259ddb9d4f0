"""Provenance stamped on every record: the software versions and device, and when it was written."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone

import numpy as np

from .. import __version__


def versions() -> dict:
    """Versions of the software that produced a number, and the device it ran on."""
    import monai
    import timm
    import torch

    out = {"cellgap": __version__, "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
           "timm": timm.__version__, "numpy": np.__version__, "platform": platform.platform()}
    for name in ("ignite", "skimage", "scipy"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        out[name] = getattr(module, "__version__", "?")
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
