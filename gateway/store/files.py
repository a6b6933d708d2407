"""Private files: SQLite databases and their WAL companions, mode 0600; the data directory 0700.

SQLite gives ``-wal`` and ``-shm`` the mode of the main file only when it creates them, and a
file left over from an older run (or made under another umask) keeps whatever mode it had; so
all three are created (or tightened) here before SQLite opens the database.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from gateway.errors import ConfigError

__all__ = ["private_directory", "private_sqlite_files"]

log = logging.getLogger(__name__)


def private_sqlite_files(path: Path) -> None:
    """Make ``path``, ``path-wal`` and ``path-shm`` exist with mode 0600."""
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def private_directory(path: Path) -> None:
    """Create ``path`` mode 0700, or tighten an existing one to 0700 (logged); refuse with a
    ConfigError saying why when that is impossible (not ours, not a directory)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory", path="data_dir")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 == 0:
        return
    try:
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ConfigError(
            f"{path} is mode {mode:04o}: it holds keys and must be 0700, and it cannot be "
            f"tightened ({exc.strerror}); run as its owner or chmod 700 it", path="data_dir",
        ) from None
    log.warning("data directory %s was mode %04o: tightened to 0700 (it holds keys)", path, mode)
