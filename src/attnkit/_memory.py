"""Peak resident memory of this process (Linux), for benchmarks and memory tests.

``ru_maxrss`` is unusable here: after fork+exec a child inherits its parent's high-water mark,
so growth measured in a subprocess reads as zero. VmHWM in /proc belongs to the process's own
address space, and writing 5 to /proc/self/clear_refs resets it to the current RSS.
"""

from __future__ import annotations

from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak-RSS mark to the current RSS; return the current RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_kb() -> int:
    """Peak RSS (KiB) since the last ``reset_peak``."""
    return _status_kb("VmHWM")
