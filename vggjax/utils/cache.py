"""Where vggjax keeps what it downloads, converts and compiles: $VGGJAX_CACHE, or ~/.cache/vggjax."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$VGGJAX_CACHE, or ~/.cache/vggjax (not created here)."""
    return Path(os.environ.get("VGGJAX_CACHE") or Path.home() / ".cache" / "vggjax")
