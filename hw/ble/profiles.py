"""BLE device profiles: ``hw/profiles/<name>.toml`` files naming a device's decoders, its format
specification, and advertisement frames with the values they must decode to (golden tests).
Pure (reads files only when asked).

File shape::

    [profile]
    bus = "ble"
    name = "ruuvitag"                 # the file name without .toml
    title = "RuuviTag"
    decoders = ["ruuvi"]
    spec = "https://docs.ruuvi.com/..."

    [[frames]]
    name = "valid data"
    source = "Ruuvi DF5 specification, test vector 'valid data'"
    address = "CB:B8:33:4C:88:4F"
    manufacturer_id = 0x0499          # or service_uuid = 0x181A
    payload = "0512FC53..."           # hex, the bytes after the company id / UUID
    bindkey = "..."                   # only for encrypted frames (a published test key)
    counter = 205                     # the packet counter the frame carries
    error = "DecryptError"            # instead of expected: the decoder must refuse it
    [frames.expected]
    temperature = 24.3
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from hw.ble.decoders import Advertisement, DecoderKind, uuid16

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"


class ProfileError(GatewayError):
    """A profile is missing or malformed."""


@dataclass(frozen=True, slots=True)
class Frame:
    name: str
    source: str
    address: str
    payload: bytes
    manufacturer_id: int | None
    service_uuid: int | None
    bindkey: str | None
    counter: int | None
    expected: dict[str, Any]
    error: str | None

    def advertisement(self, *, received: float = 0.0, rssi: int = -60) -> Advertisement:
        md = {self.manufacturer_id: self.payload} if self.manufacturer_id is not None else {}
        sd = {uuid16(self.service_uuid): self.payload} if self.service_uuid is not None else {}
        return Advertisement(self.address, rssi, received, md, sd)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    title: str
    decoders: tuple[DecoderKind, ...]
    spec: tuple[str, ...]
    frames: tuple[Frame, ...]


def load_profile(name: str, directory: Path = PROFILES_DIR) -> Profile:
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ProfileError(f"not a profile name: {name!r}")
    path = directory / f"{name}.toml"
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"no profile {name!r} in {directory}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile {name!r}: {e}") from None
    try:
        head = doc["profile"]
        if head.get("bus") != "ble":
            raise ProfileError(f"profile {name!r} is not a BLE profile")
        if head.get("name") != name:
            raise ProfileError(f"profile {name!r} names itself {head.get('name')!r}")
        spec = head.get("spec", [])
        return Profile(
            name=name,
            title=str(head["title"]),
            decoders=tuple(DecoderKind(d) for d in head["decoders"]),
            spec=tuple(spec if isinstance(spec, list) else [spec]),
            frames=tuple(_frame(f) for f in doc.get("frames", [])),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ProfileError(f"profile {name!r}: malformed ({e!r})") from None


def _frame(doc: dict[str, Any]) -> Frame:
    return Frame(
        name=str(doc["name"]),
        source=str(doc.get("source", "")),
        address=str(doc["address"]).upper(),
        payload=bytes.fromhex(str(doc["payload"])),
        manufacturer_id=doc.get("manufacturer_id"),
        service_uuid=doc.get("service_uuid"),
        bindkey=doc.get("bindkey"),
        counter=doc.get("counter"),
        expected=dict(doc.get("expected", {})),
        error=doc.get("error"),
    )
