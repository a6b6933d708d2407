"""Pure framing: the line splitter, the generic decoders and the frame reader's counters."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hw.readings import Reading
from hw.serial.framing import (
    ChecksumError,
    Decoder,
    DelimitedDecoder,
    DelimitedOptions,
    FieldSpec,
    FrameError,
    FrameReader,
    JsonLinesDecoder,
    JsonOptions,
    LineSplitter,
    MalformedLine,
    RegexDecoder,
    RegexOptions,
    parse_number,
)
from hw.serial.nmea import NmeaDecoder

NOW = 1_700_000_000.0


def values(readings: object) -> dict[str, tuple[object, str | None]]:
    assert isinstance(readings, list | tuple)
    out: dict[str, tuple[object, str | None]] = {}
    for r in readings:
        assert isinstance(r, Reading)
        assert r.acquired == NOW
        out[r.name] = (r.value, r.unit)
    return out


# -- LineSplitter ---------------------------------------------------------------------------------


def test_splitter_cuts_lf_and_crlf_and_keeps_the_partial_tail() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\r\nbb\nc") == [b"a", b"bb"]
    assert splitter.feed(b"c\r") == []
    assert splitter.feed(b"\n") == [b"cc"]


def test_splitter_skips_empty_lines() -> None:
    assert LineSplitter().feed(b"\n\r\n\nx\n\n") == [b"x"]


def test_splitter_with_cr_terminator_drops_a_following_lf() -> None:
    splitter = LineSplitter(terminator=b"\r")
    assert splitter.feed(b"a\rb\r\nc\r") == [b"a", b"b", b"c"]


def test_oversize_line_is_dropped_and_counted_once_even_across_chunks() -> None:
    splitter = LineSplitter(max_line=8)
    assert splitter.feed(b"ok\n" + b"x" * 20) == [b"ok"]
    assert splitter.oversize == 1
    assert splitter.feed(b"y" * 100) == []  # still the same oversize line: not buffered
    assert splitter.feed(b"zz\nnext\n") == [b"next"]
    assert splitter.oversize == 1
    assert splitter.feed(b"123456789\n12345678\n") == [b"12345678"]
    assert splitter.oversize == 2


def test_oversize_does_not_count_the_carriage_return() -> None:
    assert LineSplitter(max_line=4).feed(b"abcd\r\n") == [b"abcd"]


@given(
    lines=st.lists(st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\n", b"")
                                                            .replace(b"\r", b"") or b"x"),
                   max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=10),
)
def test_any_chunking_of_a_stream_gives_the_same_lines(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\r\n" for line in lines)
    splitter = LineSplitter(max_line=64)
    got: list[bytes] = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(stream)) + [len(stream)]:
        got += splitter.feed(stream[start:cut])
        start = cut
    assert got == lines


@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_splitter_never_holds_more_than_max_line(data: bytes, max_line: int) -> None:
    splitter = LineSplitter(max_line=max_line)
    for i in range(0, len(data), 97):
        for line in splitter.feed(data[i : i + 97]):
            assert 0 < len(line) <= max_line
        assert len(splitter._buf) <= max_line


# -- numbers and field specs ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("21", 21), ("-3", -3), ("+7", 7), (" 4 ", 4), ("21.5", 21.5), ("-.5", -0.5), ("1e3", 1000.0),
    ("2.", 2.0),
])
def test_parse_number_accepts_what_devices_print(text: str, value: float) -> None:
    got = parse_number(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["", "nan", "inf", "-Infinity", "1_000", "0x10", "1,5", "--1", ".",
                                  "1e999", "\u0661\u0662", "1.5.2", "e5"])
def test_parse_number_rejects_what_no_sensor_means(text: str) -> None:
    with pytest.raises(MalformedLine):
        parse_number(text)


def test_field_spec_scales_and_keeps_integers_unscaled() -> None:
    assert FieldSpec().convert("12") == 12
    assert FieldSpec(scale=0.1, offset=-40).convert(650) == pytest.approx(25.0)
    assert FieldSpec(kind="string").convert(12) == "12"
    assert FieldSpec(kind="bool").convert("ON") is True
    assert FieldSpec(kind="bool").convert(0) is False
    with pytest.raises(MalformedLine):
        FieldSpec().convert(True)
    with pytest.raises(MalformedLine):
        FieldSpec(kind="bool").convert("maybe")
    with pytest.raises(MalformedLine):
        FieldSpec(scale=1e308).convert(1e308)
    with pytest.raises(MalformedLine):
        FieldSpec(scale=0.5).convert(10**400)


# -- JSON lines -----------------------------------------------------------------------------------


def test_json_numeric_fields_become_readings_nested_paths_joined_with_slash() -> None:
    decoder = JsonLinesDecoder(JsonOptions())
    got = decoder.decode(b'{"t": 21.5, "rh": 40, "ok": true, "id": "x", "env": {"p": 1013.2},'
                         b' "list": [1, 2], "none": null}', "s", NOW)
    assert values(got) == {"t": (21.5, None), "rh": (40, None), "env/p": (1013.2, None)}


def test_json_field_map_renames_scales_and_admits_strings() -> None:
    options = JsonOptions(fields={
        "t": FieldSpec(name="temperature", unit="Cel", scale=0.1),
        "state": FieldSpec(kind="string"),
        "env/p": FieldSpec(name="pressure", unit="hPa"),
    }, only_mapped=True)
    got = JsonLinesDecoder(options).decode(
        b'{"t": 215, "state": "run", "rh": 40, "env": {"p": 1013}}', "s", NOW)
    assert values(got) == {"temperature": (pytest.approx(21.5), "Cel"), "state": ("run", None),
                           "pressure": (1013, "hPa")}


def test_json_nan_is_an_absent_value_not_a_reading() -> None:
    got = JsonLinesDecoder(JsonOptions()).decode(b'{"t": NaN, "h": Infinity, "p": 3}', "s", NOW)
    assert values(got) == {"p": (3, None)}


@pytest.mark.parametrize("line", [b"{", b"[1, 2]", b"42", b'"x"', b"\xff\xfe", b'{"a": 1} x'])
def test_json_non_objects_are_malformed(line: bytes) -> None:
    with pytest.raises(MalformedLine):
        JsonLinesDecoder(JsonOptions()).decode(line, "s", NOW)


def test_json_mapped_field_of_the_wrong_type_makes_the_line_malformed() -> None:
    decoder = JsonLinesDecoder(JsonOptions(fields={"t": FieldSpec()}))
    with pytest.raises(MalformedLine):
        decoder.decode(b'{"t": "warm"}', "s", NOW)


# -- regex ----------------------------------------------------------------------------------------


def test_regex_named_groups_become_readings_with_units() -> None:
    options = RegexOptions(
        pattern=re.compile(r"T=(?P<temperature>-?[0-9.]+)C H=(?P<humidity>[0-9.]+)%"
                           r"(?: S=(?P<status>\w+))?"),
        fields={"temperature": FieldSpec(unit="Cel"), "humidity": FieldSpec(unit="%"),
                "status": FieldSpec(kind="string")},
    )
    decoder = RegexDecoder(options)
    assert values(decoder.decode(b"#12 T=-4.5C H=81% S=ok", "s", NOW)) == {
        "temperature": (-4.5, "Cel"), "humidity": (81, "%"), "status": ("ok", None)}
    assert values(decoder.decode(b"T=20C H=50%", "s", NOW)) == {
        "temperature": (20, "Cel"), "humidity": (50, "%")}  # the optional group did not take part
    with pytest.raises(MalformedLine):
        decoder.decode(b"hello", "s", NOW)
    with pytest.raises(MalformedLine):
        decoder.decode(b"T=1.2.3C H=5%", "s", NOW)


# -- delimited ------------------------------------------------------------------------------------


def test_delimited_columns_with_skips_units_and_empty_values() -> None:
    options = DelimitedOptions(
        columns=("temperature", None, "humidity", "pressure"), separator=";",
        fields={"temperature": FieldSpec(unit="Cel"),
                "pressure": FieldSpec(unit="hPa", scale=0.01)},
    )
    decoder = DelimitedDecoder(options)
    assert values(decoder.decode(b"21.5;junk; 40 ;101325", "s", NOW)) == {
        "temperature": (21.5, "Cel"), "humidity": (40, None),
        "pressure": (pytest.approx(1013.25), "hPa")}
    assert values(decoder.decode(b"21.5;;;", "s", NOW)) == {"temperature": (21.5, "Cel")}
    with pytest.raises(MalformedLine, match="3 columns, expected 4"):
        decoder.decode(b"1;2;3", "s", NOW)
    with pytest.raises(MalformedLine):
        decoder.decode(b"temp;x;hum;press", "s", NOW)  # a header line


# -- FrameReader ----------------------------------------------------------------------------------


def test_frame_reader_counts_every_outcome_and_forwards_only_good_lines() -> None:
    reader = FrameReader("gps", NmeaDecoder(), max_line=100)
    stream = (
        b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"  # good
        b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,546.4,M,46.9,M,,*47\r\n"  # bad checksum
        b"$GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00*74\r\n"  # ignored
        b"garbage\r\n"  # malformed
        + b"$" + b"9" * 200 + b"\r\n"  # oversize
        + b"$GPVTG,054.7,T,034.4,M,005.5,N,010.2,K*48\r\n"  # good
    )
    batches = reader.feed(stream[:50], NOW) + reader.feed(stream[50:], NOW)
    assert [len(b) for b in batches] == [8, 3]
    assert all(r.sensor == "gps" for b in batches for r in b)
    assert reader.counters.as_dict() == {
        "lines": 5, "decoded": 2, "ignored": 1, "readings": 11, "badChecksum": 1,
        "malformed": 1, "oversize": 1,
    }
    assert reader.last_line is not None and reader.last_line.startswith(b"$GPVTG")
    assert reader.last_error == "not an NMEA sentence: b'garbage'"


@given(st.binary(max_size=300))
def test_decoders_raise_only_frame_errors_on_arbitrary_bytes(data: bytes) -> None:
    decoders: list[Decoder] = [
        NmeaDecoder(),
        JsonLinesDecoder(JsonOptions(fields={"a": FieldSpec(kind="bool")})),
        RegexDecoder(RegexOptions(pattern=re.compile(r"(?P<v>\S+)"))),
        DelimitedDecoder(DelimitedOptions(columns=("a", "b"))),
    ]
    for decoder in decoders:
        try:
            decoder.decode(data, "s", NOW)
        except FrameError:
            pass


def test_checksum_error_is_a_remote_protocol_error() -> None:
    from gateway.errors import RemoteProtocolError

    assert issubclass(ChecksumError, RemoteProtocolError)
    assert issubclass(MalformedLine, RemoteProtocolError)
