"""The pure BLE decoders: BTHome v2 (plain and AES-CCM), Ruuvi DF5, pvvx/ATC1441, GATT
Environmental Sensing values, and de-duplication. Examples are the specs' own where they
publish them (bthome.io format table and encryption page, Ruuvi DF5 test vectors)."""

from __future__ import annotations

import functools
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hw.ble.decoders import (
    BTHOME_OBJECTS,
    AdvertisementError,
    BindKey,
    Decoded,
    DecoderKind,
    DecryptError,
    Dedup,
    Verdict,
    decode_atc,
    decode_atc1441,
    decode_bthome,
    decode_gatt,
    decode_pvvx,
    decode_ruuvi,
    encode_bthome,
    mac_bytes,
    uuid16,
)

REPO = Path(__file__).resolve().parents[3]
MAC = mac_bytes("54:48:E6:8F:80:A5")
KEY = BindKey.from_hex("231d39c1d7cc1ab1aee224cd096db932")


def values(decoded: Decoded) -> dict[str, object]:
    return {m.name: m.value for m in decoded.measures}


# bthome.io/format "Supported data types": (object bytes, name, value, unit) from its
# Example and Result columns.
BTHOME_TABLE = [
    ("0161", "battery", 97, "%"),
    ("12E204", "co2", 1250, "[ppm]"),
    ("56E803", "conductivity", 1000, "uS/cm"),
    ("0960", "count", 96, None),
    ("3D0960", "count", 24585, None),
    ("3E2A2C0960", "count", 1611213866, None),
    ("59EA", "count", -22, None),
    ("5AEAEA", "count", -5398, None),
    ("5BEA0234EA", "count", -365690134, None),
    ("434E34", "current", 13.39, "A"),
    ("5D02EA", "current", -5.63, "A"),
    ("08CA06", "dewPoint", 17.38, "Cel"),
    ("400C00", "distance", 12, "mm"),
    ("414E00", "distance", 7.8, "m"),
    ("424E3400", "duration", 13.39, "s"),
    ("4D12138A14", "energy", 344593.17, "kWh"),
    ("0A138A14", "energy", 1346.067, "kWh"),
    ("4B138A14", "gas", 1346.067, "m3"),
    ("4C41018A01", "gas", 25821.505, "m3"),
    ("518756", "acceleration", 22.151, "m/s2"),
    ("528756", "gyroscope", 22.151, "deg/s"),
    ("03BF13", "humidity", 50.55, "%"),
    ("2E23", "humidity", 35, "%"),
    ("05138A14", "illuminance", 13460.67, "lx"),
    ("065E1F", "mass", 80.3, "kg"),
    ("073E1D", "mass", 74.86, "[lb_av]"),
    ("14020C", "moisture", 30.74, "%"),
    ("2F23", "moisture", 35, "%"),
    ("0D120C", "pm25", 3090, "ug/m3"),
    ("0E021C", "pm10", 7170, "ug/m3"),
    ("0B021B00", "power", 69.14, "W"),
    ("04138A01", "pressure", 1008.83, "hPa"),
    ("02CA09", "temperature", 25.06, "Cel"),
    ("0C020C", "voltage", 3.074, "V"),
    ("1001", "powerOn", True, None),
    ("2D00", "window", False, None),
]


@pytest.mark.parametrize(("objects", "name", "value", "unit"), BTHOME_TABLE)
def test_bthome_object_table_examples_decode_to_the_published_results(
        objects: str, name: str, value: object, unit: str | None) -> None:
    decoded = decode_bthome(bytes.fromhex("40" + objects), MAC)
    assert [(m.name, m.value, m.unit) for m in decoded.measures] == [(name, value, unit)]
    assert type(decoded.measures[0].value) is type(value)


def test_bthome_packet_id_is_the_counter_not_a_reading() -> None:
    decoded = decode_bthome(bytes.fromhex("40003f015e02820803ac170c830b"), MAC)
    assert decoded.counter == 63 and not decoded.encrypted
    assert values(decoded) == {"battery": 94, "temperature": 21.78, "humidity": 60.6,
                               "voltage": 2.947}


def test_bthome_decrypts_the_published_example_and_rebuilds_it_byte_for_byte() -> None:
    frame = bytes.fromhex("41e445f3c9962b332211006c7c4519")  # bthome.io/encryption
    decoded = decode_bthome(frame, MAC, KEY)
    assert values(decoded) == {"temperature": 25.06, "humidity": 50.55}
    assert decoded.counter == 0x00112233 and decoded.encrypted
    assert encode_bthome(bytes.fromhex("02ca0903bf13"), mac=MAC, key=KEY,
                         counter=0x00112233) == frame


@pytest.mark.parametrize("frame", [
    "41e545f3c9962b332211006c7c4519",  # ciphertext bit flipped
    "41e445f3c9962b332211016c7c4519",  # counter changed (it is in the nonce)
    "41e445f3c9962b332211006c7c4518",  # MIC changed
])
def test_bthome_rejects_tampered_encrypted_frames(frame: str) -> None:
    with pytest.raises(DecryptError, match="MIC"):
        decode_bthome(bytes.fromhex(frame), MAC, KEY)


def test_bthome_encrypted_frame_needs_the_right_mac_and_a_key() -> None:
    frame = bytes.fromhex("41e445f3c9962b332211006c7c4519")
    with pytest.raises(DecryptError):
        decode_bthome(frame, mac_bytes("54:48:E6:8F:80:A6"), KEY)
    with pytest.raises(DecryptError, match="no bindkey"):
        decode_bthome(frame, MAC)


def test_bthome_events_text_raw_repeats_and_device_info() -> None:
    decoded = decode_bthome(bytes.fromhex(
        "44" "F00100" "02CA09" "02BF13" "3A01" "3A00" "3C0103"
        "530C48656C6C6F20576F726C6421" "5402BEEF"), MAC)
    assert [(m.name, m.value) for m in decoded.measures] == [
        ("temperature", 25.06), ("temperature2", 50.55), ("button", "press"),
        ("dimmer", "rotate_left:3"), ("text", "Hello World!"), ("raw", "beef")]


def test_bthome_stops_at_an_unknown_object_id_as_the_spec_says() -> None:
    assert values(decode_bthome(bytes.fromhex("4002CA09EE03BF13"), MAC)) == {
        "temperature": 25.06}


@pytest.mark.parametrize(("frame", "message"), [
    ("", "empty"),
    ("2002CA09", "version 1"),
    ("4002CA", "truncated object 0x02"),
    ("4000", "truncated packet id"),
    ("4053FF41", "truncated object 0x53"),
    ("41e445f3c9", "too short"),
])
def test_bthome_malformed_frames_raise_advertisement_error(frame: str, message: str) -> None:
    with pytest.raises(AdvertisementError, match=message):
        decode_bthome(bytes.fromhex(frame), MAC, KEY)


@st.composite
def fixed_objects(draw: st.DrawFn) -> bytes:
    """A run of fixed-size BTHome objects with arbitrary values."""
    ids = draw(st.lists(st.sampled_from(
        [oid for oid, o in BTHOME_OBJECTS.items() if o.size > 0]), max_size=6))
    size = BTHOME_OBJECTS.__getitem__
    return b"".join(bytes([i]) + draw(st.binary(min_size=size(i).size, max_size=size(i).size))
                    for i in ids)


@given(objects=fixed_objects(), counter=st.integers(0, 2**32 - 1),
       mac=st.binary(min_size=6, max_size=6), key=st.binary(min_size=16, max_size=16))
def test_bthome_encrypted_round_trip_equals_the_plain_decode(
        objects: bytes, counter: int, mac: bytes, key: bytes) -> None:
    plain_objects = objects
    bindkey = BindKey(key)
    sealed = encode_bthome(plain_objects, mac=mac, key=bindkey, counter=counter)
    decoded = decode_bthome(sealed, mac, bindkey)
    assert decoded.measures == decode_bthome(encode_bthome(plain_objects), mac).measures
    assert decoded.counter == counter


@given(st.binary(max_size=40))
def test_arbitrary_bytes_only_ever_raise_advertisement_error(data: bytes) -> None:
    for decoder in (functools.partial(decode_bthome, mac=MAC, key=KEY), decode_ruuvi,
                    decode_atc):
        try:
            decoder(data)
        except AdvertisementError:
            pass


def test_ruuvi_rejects_other_data_formats_and_short_payloads() -> None:
    with pytest.raises(AdvertisementError, match="data format 3"):
        decode_ruuvi(bytes.fromhex("03291A1ECE1EFC18F94202CA0B53"))
    with pytest.raises(AdvertisementError, match="24 bytes"):
        decode_ruuvi(bytes.fromhex("0512FC5394"))


def test_ruuvi_leaves_out_unavailable_fields_and_uses_the_sequence_as_counter() -> None:
    frame = bytearray.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
    frame[1:3] = b"\x80\x00"  # temperature not available
    decoded = decode_ruuvi(bytes(frame))
    assert "temperature" not in values(decoded) and decoded.counter == 205


def test_pvvx_and_atc1441_are_told_apart_by_length() -> None:
    pvvx = struct.pack("<6shHHBBB", b"\x56\x34\x12\x38\xc1\xa4", -1, 1, 3000, 100, 9, 0)
    atc = struct.pack(">6shBBHB", b"\xa4\xc1\x38\x12\x34\x56", -1, 1, 100, 3000, 9)
    assert decode_atc(pvvx).kind is DecoderKind.PVVX
    assert values(decode_atc(pvvx))["temperature"] == -0.01
    assert decode_atc(atc).kind is DecoderKind.ATC1441
    assert values(decode_atc(atc))["temperature"] == -0.1
    assert decode_pvvx(pvvx).counter == decode_atc1441(atc).counter == 9
    with pytest.raises(AdvertisementError, match="neither"):
        decode_atc(pvvx[:-1])


def test_gatt_environmental_sensing_values_and_their_scaling() -> None:
    assert decode_gatt(uuid16(0x2A6E), b"\x66\x08") == ("temperature", 21.5, "Cel")
    assert decode_gatt(uuid16(0x2A6E), (-1805).to_bytes(2, "little", signed=True)) == (
        "temperature", -18.05, "Cel")
    assert decode_gatt(uuid16(0x2A6E), b"\x00\x80") is None  # "value is not known"
    assert decode_gatt(uuid16(0x2A6F), (4550).to_bytes(2, "little")) == ("humidity", 45.5, "%")
    assert decode_gatt(uuid16(0x2A6F), b"\xff\xff") is None
    assert decode_gatt(uuid16(0x2A6D), (1013250).to_bytes(4, "little")) == (
        "pressure", 1013.25, "hPa")
    assert decode_gatt(uuid16(0x2A19), b"\x64") is None  # not an Environmental Sensing value
    with pytest.raises(AdvertisementError, match="too short"):
        decode_gatt(uuid16(0x2A6D), b"\x01\x02")


def plain(counter: int | None, raw: bytes = b"x") -> Decoded:
    return Decoded(DecoderKind.PVVX, (), counter, raw)


def sealed(counter: int) -> Decoded:
    return Decoded(DecoderKind.BTHOME, (), counter, b"", encrypted=True)


def test_dedup_drops_a_repeated_counter_within_the_window_only() -> None:
    d = Dedup(60.0)
    assert d.check(plain(42), 0.0) is Verdict.NEW
    assert d.check(plain(42), 10.0) is Verdict.DUPLICATE
    assert d.check(plain(43), 11.0) is Verdict.NEW
    assert d.check(plain(43), 71.5) is Verdict.NEW  # a stuck counter still reports now and then
    assert d.check(plain(42), 72.0) is Verdict.NEW  # 8-bit counters wrap: not a replay


def test_dedup_uses_the_payload_when_a_format_has_no_counter() -> None:
    d = Dedup(30.0)
    assert d.check(plain(None, b"a"), 0.0) is Verdict.NEW
    assert d.check(plain(None, b"a"), 5.0) is Verdict.DUPLICATE
    assert d.check(plain(None, b"b"), 6.0) is Verdict.NEW


def test_dedup_refuses_encrypted_counters_that_go_back_until_reset() -> None:
    d = Dedup(60.0)
    assert d.check(sealed(100), 0.0) is Verdict.NEW
    assert d.check(sealed(100), 999.0) is Verdict.DUPLICATE  # the same frame, however late
    assert d.check(sealed(99), 1.0) is Verdict.REPLAY
    assert d.check(sealed(101), 2.0) is Verdict.NEW
    d.reset()
    assert d.check(sealed(1), 3.0) is Verdict.NEW
    lax = Dedup(60.0, replay_protection=False)
    lax.check(sealed(100), 0.0)
    assert lax.check(sealed(5), 1.0) is Verdict.NEW


def test_a_bindkey_never_shows_its_bytes() -> None:
    assert repr(KEY) == "BindKey(<redacted>)" and "231d" not in repr([KEY])
    with pytest.raises(ValueError, match="16 bytes"):
        BindKey(b"short")
    with pytest.raises(ValueError, match="hex") as e:
        BindKey.from_hex("secret-but-not-hex-at-all-000000")
    assert "secret" not in str(e.value)


def test_decoders_config_and_profiles_import_no_io_and_no_bleak() -> None:
    code = ("import sys\nbefore = set(sys.modules)\n"
            "import hw.ble.decoders, hw.ble.config, hw.ble.profiles\n"
            "banned = {'asyncio', 'socket', 'bleak', 'dbus_fast', 'serial', 'pymodbus'}\n"
            "print(sorted(banned & {m.split('.')[0] for m in set(sys.modules) - before}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"
