"""Fields of /proc/cpuinfo (vendor, flags), read without torch."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_field(name: str, cpuinfo: Path | None = None) -> str:
    """Field ``name`` of the first CPU in ``cpuinfo`` (default /proc/cpuinfo), e.g.
    ``vendor_id``; empty when it cannot be read."""
    try:
        text = (cpuinfo or CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""
