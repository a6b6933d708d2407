"""The profile library: every Modbus profile parses, cites its datasheet, and its golden RTU
frames are exactly what the planner sends and decode to the recorded values."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from hw.modbus.profiles import PROFILE_DIR, ProfileLibrary
from hw.modbus.registers import plan_blocks
from tests.hw.modbus.peers import parse_golden

LIBRARY = ProfileLibrary()
NAMES = LIBRARY.names()


def test_the_library_holds_the_promised_profiles() -> None:
    assert {"eastron-sdm120", "eastron-sdm630", "transmitter-4-20ma-waveshare-ai8"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_profile_cites_its_datasheet(name: str) -> None:
    profile = LIBRARY(name)
    assert len(profile.datasheet) > 20 and profile.title
    text = (PROFILE_DIR / f"{name}.toml").read_text()
    assert text.startswith("#") and "Source:" in text


@pytest.mark.parametrize("name", NAMES)
def test_goldens_cover_every_planned_request(name: str) -> None:
    profile = LIBRARY(name)
    blocks = plan_blocks(profile.points, max_registers=profile.max_registers,
                         max_gap=profile.max_gap)
    planned = {(b.table.function_code, b.address, b.count): b for b in blocks}
    goldens = [parse_golden(g) for g in profile.goldens]
    assert {(g.function, g.address, g.count) for g in goldens} == set(planned)
    assert all(b.count <= profile.max_registers for b in blocks)


@pytest.mark.parametrize("name", NAMES)
def test_golden_responses_decode_to_the_expected_values(name: str) -> None:
    profile = LIBRARY(name)
    blocks = {(b.table.function_code, b.address, b.count): b
              for b in plan_blocks(profile.points, max_registers=profile.max_registers,
                                   max_gap=profile.max_gap)}
    for raw in profile.goldens:
        golden = parse_golden(raw)
        block = blocks[(golden.function, golden.address, golden.count)]
        decoded = {p.name: v for p, v in block.decode(golden.registers)}
        assert decoded == golden.expected, golden.description


def test_sdm120_voltage_is_the_datasheet_float() -> None:
    """230.4 V is 0x43666666 in IEEE 754 float32, high word first."""
    raw = LIBRARY("eastron-sdm120").goldens[0]
    golden = parse_golden(raw)
    assert golden.registers[:2] == [0x4366, 0x6666] and golden.expected["voltage"] == 230.4


def test_unknown_and_foreign_profiles_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        LIBRARY("nope")
    with pytest.raises(ConfigError, match="invalid profile name"):
        LIBRARY("../etc/passwd")
    foreign = [p.stem for p in PROFILE_DIR.glob("*.toml") if p.stem not in NAMES]
    for name in foreign:  # other bridges' device files share the directory
        with pytest.raises(ConfigError, match="not a Modbus profile"):
            LIBRARY(name)
