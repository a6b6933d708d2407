"""NMEA 0183: the GPS profile's golden sentences, checksums, and decoded values by property."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hw.serial.config import parse_config
from hw.serial.framing import ChecksumError, FrameError, FrameReader, MalformedLine
from hw.serial.nmea import NmeaDecoder, NmeaOptions, checksum, with_checksum

PROFILE = json.loads(
    (Path(__file__).resolve().parents[3] / "hw" / "profiles" / "nmea-gps.json").read_text()
)
NOW = 1_700_000_000.0


def decoded(line: bytes | str, decoder: NmeaDecoder | None = None) -> dict[str, Any] | None:
    raw = line.encode() if isinstance(line, str) else line
    readings = (decoder or NmeaDecoder()).decode(raw, "gps", NOW)
    if readings is None:
        return None
    assert all(r.sensor == "gps" and r.acquired == NOW for r in readings)
    return {r.name: [r.value, r.unit] for r in readings}


@pytest.mark.parametrize("case", PROFILE["golden"], ids=lambda c: c["line"][:24])
def test_profile_golden_sentence(case: dict[str, Any]) -> None:
    if "error" in case:
        expected = {"badChecksum": ChecksumError, "malformed": MalformedLine}[case["error"]]
        with pytest.raises(expected):
            decoded(case["line"])
        return
    got = decoded(case["line"])
    if case.get("ignored"):
        assert got is None
        return
    assert got is not None
    assert list(got) == list(case["readings"])  # names, in order
    for name, (value, unit) in case["readings"].items():
        assert got[name][1] == unit, name
        if isinstance(value, float):
            assert got[name][0] == pytest.approx(value, abs=1e-8), name
        else:
            assert got[name][0] == value and type(got[name][0]) is type(value), name


def test_profile_port_section_is_a_valid_bridge_port() -> None:
    config = parse_config({"ports": {"gps": {**PROFILE["port"], "path": "/dev/serial/by-id/x"}}})
    assert config.ports["gps"].decoder == NmeaOptions()


def test_profile_stream_through_a_frame_reader_counts_what_the_profile_says() -> None:
    reader = FrameReader("gps", NmeaDecoder(), max_line=164)
    stream = b"".join(case["line"].encode() + b"\r\n" for case in PROFILE["golden"])
    reader.feed(stream, NOW)
    cases = PROFILE["golden"]
    counts = reader.counters
    assert counts.bad_checksum == sum(c.get("error") == "badChecksum" for c in cases)
    assert counts.malformed == sum(c.get("error") == "malformed" for c in cases)
    assert counts.ignored == sum(bool(c.get("ignored")) for c in cases)
    assert counts.decoded == sum("readings" in c for c in cases)
    assert counts.readings == sum(len(c.get("readings", {})) for c in cases)


# -- checksum -------------------------------------------------------------------------------------


@given(st.binary(max_size=600))
def test_folding_checksum_equals_the_bytewise_xor(body: bytes) -> None:
    expected = 0
    for byte in body:
        expected ^= byte
    assert checksum(body) == expected


def test_lower_case_checksum_digits_are_accepted() -> None:
    assert decoded("$GPGSA,A,3,23,29,07,08,09,18,26,28,,,,,1.94,1.18,1.54*0d") is not None


@pytest.mark.parametrize("tail", ["*4", "*477", "*G7", "* 47", "*"])
def test_a_checksum_field_that_is_not_two_hex_digits_is_a_checksum_error(tail: str) -> None:
    with pytest.raises(ChecksumError):
        decoded("$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,," + tail)


def test_missing_checksum_is_accepted_only_when_not_required() -> None:
    line = "$GPVTG,054.7,T,034.4,M,005.5,N,010.2,K"
    with pytest.raises(ChecksumError, match="missing"):
        decoded(line)
    relaxed = NmeaDecoder(NmeaOptions(require_checksum=False))
    assert decoded(line, relaxed) == {"course": [54.7, "deg"], "courseMagnetic": [34.4, "deg"],
                                      "speed": [2.833, "m/s"]}


def test_sentence_types_not_selected_are_ignored() -> None:
    only_rmc = NmeaDecoder(NmeaOptions(sentences=frozenset({"RMC"})))
    assert decoded("$GPGSA,A,3,04,05,,09,12,,,24,,,,,2.5,1.3,2.1*39", only_rmc) is None
    with pytest.raises(ValueError, match="GSV"):
        NmeaDecoder(NmeaOptions(sentences=frozenset({"GSV"})))


# -- fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "problem"), [
    ("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9", "fields"),
    ("GPGGA,123519,4807.038,X,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "hemisphere"),
    ("GPGGA,123519,9107.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "range"),
    ("GPGGA,123519,48A7.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "coordinate"),
    ("GPGGA,123519,4807.038,N,01131.000,E,-1,08,0.9,545.4,M,46.9,M,,", "quality"),
    ("GPGGA,123519,4807.038,N,01131.000,E,1,+8,0.9,545.4,M,46.9,M,,", "satellites"),
    ("GPGGA,253519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "time"),
    ("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,nan,M,46.9,M,,", "finite"),
    ("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,320394,003.1,W", "date"),
    ("GPRMC,123519,X,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W", "status"),
    ("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,Q", "variation"),
    ("GPVTG,054.7,034.4,005.5,010.2", "layout"),
    ("GPGG,1", "address"),
    ("GP GGA,1", "address"),
])
def test_broken_fields_under_a_valid_checksum_are_malformed(body: str, problem: str) -> None:
    with pytest.raises(MalformedLine):
        NmeaDecoder().decode(with_checksum(body), "gps", NOW)


def test_rmc_two_digit_years_are_read_in_the_gps_era() -> None:
    got = decoded(with_checksum("GPRMC,000000,V,,,,,,,010180,,"))
    assert got is not None and got["utcDateTime"][0] == "1980-01-01T00:00:00Z"
    got = decoded(with_checksum("GPRMC,235959.5,V,,,,,,,311279,,"))
    assert got is not None and got["utcDateTime"][0] == "2079-12-31T23:59:59.5Z"


def test_rmc_mode_n_means_no_valid_fix_even_with_status_a() -> None:
    got = decoded(with_checksum("GPRMC,123519,A,4807.038,N,01131.000,E,0.0,0.0,230394,,,N"))
    assert got == {"utcDateTime": ["1994-03-23T12:35:19Z", None], "fixValid": [False, None]}


def test_gsa_without_a_fix_gives_only_the_fix_type() -> None:
    got = decoded(with_checksum("GPGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99"))
    assert got == {"fixType": [1, None]}


def test_vtg_speed_falls_back_to_knots_when_kmh_is_empty() -> None:
    assert decoded(with_checksum("GPVTG,10.0,T,,M,1.0,N,,K,A")) == {
        "course": [10.0, "deg"], "speed": [0.514, "m/s"]}
    assert decoded(with_checksum("GPVTG,,T,,M,,N,,K,N")) == {}  # mode N: no valid data


def test_encapsulated_and_proprietary_sentences_are_checked_then_ignored() -> None:
    assert decoded(b"!AIVDM,1,1,,B,15M67FC000G?ufbE`FepT@3n00Sa,0*5C") is None
    with pytest.raises(ChecksumError):
        decoded(b"!AIVDM,1,1,,B,15M67FC000G?ufbE`FepT@3n00Sa,0*5D")


def _ddmm(value: float, degree_digits: int) -> str:
    degrees = int(value)
    minutes = round((value - degrees) * 60, 5)
    if minutes >= 60:
        degrees, minutes = degrees + 1, 0.0
    return f"{degrees:0{degree_digits}d}{minutes:08.5f}"


@given(
    lat=st.floats(min_value=-89.99, max_value=89.99),
    lon=st.floats(min_value=-179.99, max_value=179.99),
    alt=st.floats(min_value=-400, max_value=9000).map(lambda a: round(a, 1)),
    sats=st.integers(min_value=0, max_value=40),
)
def test_gga_positions_decode_to_the_degrees_they_encode(
    lat: float, lon: float, alt: float, sats: int
) -> None:
    body = (f"GNGGA,101010.00,{_ddmm(abs(lat), 2)},{'N' if lat >= 0 else 'S'},"
            f"{_ddmm(abs(lon), 3)},{'E' if lon >= 0 else 'W'},1,{sats:02d},0.8,{alt},M,47.0,M,,")
    got = decoded(with_checksum(body))
    assert got is not None
    assert got["latitude"][0] == pytest.approx(lat, abs=1e-6)  # 5 decimals of minutes: 1.7e-7 deg
    assert got["longitude"][0] == pytest.approx(lon, abs=1e-6)
    assert got["altitude"] == [alt, "m"]
    assert got["satellites"] == [sats, None]


FIELD = st.text(alphabet="0123456789.-NSEWAVMTKn,", max_size=12)


@given(kind=st.sampled_from(["GGA", "RMC", "GSA", "VTG"]), fields=st.lists(FIELD, max_size=20))
def test_valid_checksums_over_arbitrary_fields_raise_only_frame_errors(
    kind: str, fields: list[str]
) -> None:
    try:
        NmeaDecoder().decode(with_checksum(",".join(["GP" + kind, *fields])), "gps", NOW)
    except FrameError:
        pass
