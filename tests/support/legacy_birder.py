"""An old birder release (0.3.3), unpacked beside the venv by ``make install``, which writes reference files
through ``legacy_birder_writer.py`` in its own process."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


LEGACY_VERSION = "0.3.3"
WRITER = Path(__file__).with_name("legacy_birder_writer.py")


def legacy_birder_dir() -> Path:
    return Path(os.environ.get("VITREG_JAX_LEGACY_BIRDER", ROOT / ".venv" / f"birder-{LEGACY_VERSION}"))
