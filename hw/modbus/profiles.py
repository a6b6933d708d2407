"""The profile library: one TOML file per device model in ``hw/profiles/``.

A profile holds the model's public register map (with the datasheet it comes from), read
limits the model imposes (``max_registers`` per request, ``max_gap`` holes it tolerates), a
suggested polling interval, and golden frames: RTU request/response pairs with the values they
must decode to, checked in CI (tests/hw/modbus/test_profiles.py).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from gateway.errors import ConfigError
from hw.modbus.config import Profile, parse_profile

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class ProfileLibrary:
    """Loads profiles by name from a directory, parsing each file once."""

    def __init__(self, directory: Path = PROFILE_DIR) -> None:
        self.directory = directory
        self._cache: dict[str, Profile] = {}

    def names(self) -> list[str]:
        """Modbus profiles only: the directory is shared with other bridges' device files."""
        names = []
        for path in sorted(self.directory.glob("*.toml")):
            try:
                head = tomllib.loads(path.read_text(encoding="utf-8")).get("profile")
            except (OSError, tomllib.TOMLDecodeError):
                continue
            if isinstance(head, dict) and head.get("bus") == "modbus":
                names.append(path.stem)
        return names

    def __call__(self, name: str) -> Profile:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if not _NAME.match(name):
            raise ConfigError(f"invalid profile name {name!r}")
        path = self.directory / f"{name}.toml"
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"no profile {name!r} (known: {', '.join(self.names()) or 'none'})") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"profile {name!r}: {exc}") from None
        try:
            profile = parse_profile(raw, name)
        except ConfigError as exc:
            raise ConfigError(f"profile {name!r}: {exc}") from None
        self._cache[name] = profile
        return profile
