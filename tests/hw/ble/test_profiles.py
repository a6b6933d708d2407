"""Golden tests: every frame in the BLE profiles (hw/profiles/*.toml) decodes, through the
profile's own decoders, to exactly the values written beside it, or is refused as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from hw.ble.decoders import BindKey, Decoded, decode, mac_bytes, payload_for
from hw.ble.profiles import PROFILES_DIR, Frame, Profile, ProfileError, load_profile

BLE_PROFILES = ["ruuvitag", "xiaomi-lywsd03mmc"]


def frames() -> list[tuple[Profile, Frame]]:
    out: list[tuple[Profile, Frame]] = []
    for name in BLE_PROFILES:
        profile = load_profile(name)
        out.extend((profile, f) for f in profile.frames)
    return out


def decode_frame(profile: Profile, frame: Frame) -> list[Decoded]:
    adv = frame.advertisement(received=1.0)
    key = BindKey.from_hex(frame.bindkey) if frame.bindkey else None
    decoded = []
    for kind in profile.decoders:
        payload = payload_for(kind, adv)
        if payload is not None:
            decoded.append(decode(kind, payload, mac_bytes(frame.address), key))
    return decoded


@pytest.mark.parametrize(("profile", "frame"), frames(),
                         ids=[f"{p.name}:{f.name}" for p, f in frames()])
def test_profile_frame_decodes_to_its_expected_values(profile: Profile, frame: Frame) -> None:
    if frame.error is not None:
        with pytest.raises(Exception) as e:
            decode_frame(profile, frame)
        assert type(e.value).__name__ == frame.error
        return
    [decoded] = decode_frame(profile, frame)  # exactly one of the profile's decoders applies
    assert {m.name: m.value for m in decoded.measures} == frame.expected
    for m in decoded.measures:
        assert type(m.value) is type(frame.expected[m.name]), m.name
    assert decoded.counter == frame.counter
    readings = decoded.readings("s1", 1.0)
    assert [r.as_json()["name"] for r in readings] == list(frame.expected)


def test_profiles_cite_their_specs_and_carry_frames() -> None:
    for name in BLE_PROFILES:
        profile = load_profile(name)
        assert profile.spec and all(s.startswith("https://") for s in profile.spec)
        assert len(profile.frames) >= 4
        assert all(f.source for f in profile.frames)


def test_unknown_or_foreign_profiles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no profile"):
        load_profile("no_such_device")
    with pytest.raises(ProfileError, match="not a profile name"):
        load_profile("../etc/passwd")
    (tmp_path / "meter.toml").write_text('[profile]\nbus = "modbus"\nname = "meter"\n')
    with pytest.raises(ProfileError, match="not a BLE profile"):
        load_profile("meter", tmp_path)
    (tmp_path / "tag.toml").write_text('[profile]\nbus = "ble"\nname = "tag"\ntitle = "T"\n'
                                       'decoders = ["eddystone"]\n')
    with pytest.raises(ProfileError, match="malformed"):
        load_profile("tag", tmp_path)
    assert PROFILES_DIR.is_dir()
