"""What a process holds, read from /proc: resident memory, its peak, open descriptors."""

from __future__ import annotations

import os


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS)."""
    return _status(pid, "VmRSS")


def peak_rss(pid: int) -> int:
    """The highest resident set size so far, in bytes (VmHWM)."""
    return _status(pid, "VmHWM")


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def fds(pid: int) -> int:
    """Open file descriptors."""
    return len(os.listdir(f"/proc/{pid}/fd"))
