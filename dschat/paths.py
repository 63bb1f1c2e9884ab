"""Where dschat keeps its files: $XDG_CONFIG_HOME, $XDG_DATA_HOME and $XDG_CACHE_HOME, each + /dschat."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {"CONFIG": ".config", "DATA": ".local/share", "CACHE": ".cache"}


def xdg(kind: str) -> Path:
    """dschat's directory of one XDG kind (CONFIG, DATA or CACHE), with the usual defaults."""
    base = os.environ.get(f"XDG_{kind}_HOME") or str(Path.home() / DEFAULTS[kind])
    return Path(base) / "dschat"


def kv_dir() -> Path:
    """The latent cache of saved conversations, on disk (engine/persist.py)."""
    return xdg("CACHE") / "kv"
