"""Desired properties -> frozen config; every error names its key path."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import ConfigError
from hw.hotplug import MatchRule
from hw.serial.config import parse_config
from hw.serial.framing import DelimitedOptions, FieldSpec, JsonOptions, RegexOptions
from hw.serial.nmea import NmeaOptions
from hw.serial.port import LinkSettings

BY_ID = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A000-if00-port0"


def port(**overrides: Any) -> dict[str, Any]:
    return {"ports": {"gps": {"path": BY_ID, **overrides}}}


def test_defaults_for_a_minimal_port() -> None:
    cfg = parse_config(port()).ports["gps"]
    assert cfg.sensor == "gps"
    assert cfg.path == BY_ID and cfg.match is None
    assert cfg.link == LinkSettings(baud=9600, data_bits=8, parity="N", stop_bits=1)
    assert cfg.format == "nmea" and cfg.decoder == NmeaOptions()
    assert cfg.max_line == 164 and cfg.terminator == b"\n"
    assert (cfg.reconnect_min, cfg.reconnect_max, cfg.silence_timeout) == (0.5, 30.0, None)
    assert cfg.enabled


def test_every_key_parsed() -> None:
    cfg = parse_config(port(
        sensor="boiler", baud=115200, dataBits=7, parity="E", stopBits=2, format="jsonl",
        decoder={"fields": {"t": {"name": "temperature", "unit": "Cel", "scale": 0.1,
                                  "offset": -40, "kind": "number"}}, "onlyMapped": True},
        maxLine=512, terminator="cr", reconnectMin=0.1, reconnectMax=5, silenceTimeout=10,
        enabled=False,
    )).ports["gps"]
    assert cfg.sensor == "boiler"
    assert cfg.link == LinkSettings(baud=115200, data_bits=7, parity="E", stop_bits=2)
    assert cfg.decoder == JsonOptions(
        fields={"t": FieldSpec(name="temperature", unit="Cel", scale=0.1, offset=-40.0)},
        only_mapped=True)
    assert (cfg.max_line, cfg.terminator) == (512, b"\r")
    assert (cfg.reconnect_min, cfg.reconnect_max, cfg.silence_timeout) == (0.1, 5.0, 10.0)
    assert not cfg.enabled


def test_regex_and_delimited_decoders() -> None:
    regex = parse_config(port(format="regex", decoder={
        "pattern": r"W=(?P<weight>[0-9.]+)", "fields": {"weight": {"unit": "kg"}}})).ports["gps"]
    assert isinstance(regex.decoder, RegexOptions)
    assert regex.decoder.pattern.pattern == r"W=(?P<weight>[0-9.]+)"
    delimited = parse_config(port(format="delimited", decoder={
        "separator": ";", "columns": ["a", None, "b"]})).ports["gps"]
    assert delimited.decoder == DelimitedOptions(columns=("a", None, "b"), separator=";")


def test_match_rule_instead_of_a_path() -> None:
    cfg = parse_config({"ports": {"gps": {"match": {"vendorId": "1546", "modelId": "01A7"}}}})
    assert cfg.ports["gps"].match == MatchRule(name="gps", vendor_id="1546", model_id="01a7")
    assert cfg.rules == (MatchRule(name="gps", vendor_id="1546", model_id="01a7"),)


def test_null_ports_are_removed_ports() -> None:
    assert parse_config({"ports": {"gps": None}}).ports == {}
    assert parse_config({}).ports == {}


@pytest.mark.parametrize(("desired", "path"), [
    ({"port": {}}, "port"),
    ({"ports": []}, "ports"),
    ({"ports": {"gps": "x"}}, "ports.gps"),
    ({"ports": {"g ps": {"path": BY_ID}}}, "ports.g ps"),
    (port(baudrate=9600), "ports.gps.baudrate"),
    (port(baud="9600"), "ports.gps.baud"),
    (port(baud=True), "ports.gps.baud"),
    (port(baud=10), "ports.gps.baud"),
    (port(parity="X"), "ports.gps.parity"),
    (port(dataBits=9), "ports.gps.dataBits"),
    (port(stopBits=3), "ports.gps.stopBits"),
    (port(format="xml"), "ports.gps.format"),
    (port(path="dev/ttyUSB0"), "ports.gps.path"),
    (port(match={"vendorId": "0403"}), "ports.gps"),
    ({"ports": {"gps": {}}}, "ports.gps"),
    ({"ports": {"gps": {"match": {"vendorId": "403"}}}}, "ports.gps.match"),
    ({"ports": {"gps": {"match": {"vendor": "0403"}}}}, "ports.gps.match.vendor"),
    (port(decoder={"sentences": ["GSV"]}), "ports.gps.decoder.sentences"),
    (port(decoder={"sentences": "GGA"}), "ports.gps.decoder.sentences"),
    (port(decoder={"requireChecksum": "yes"}), "ports.gps.decoder.requireChecksum"),
    (port(decoder={"checksum": True}), "ports.gps.decoder.checksum"),
    (port(format="regex"), "ports.gps.decoder"),
    (port(format="regex", decoder={"pattern": "("}), "ports.gps.decoder.pattern"),
    (port(format="regex", decoder={"pattern": "x"}), "ports.gps.decoder.pattern"),
    (port(format="regex", decoder={"pattern": "(?P<a>x)", "fields": {"b": {}}}),
     "ports.gps.decoder.fields.b"),
    (port(format="delimited", decoder={"columns": "a,b"}), "ports.gps.decoder.columns"),
    (port(format="delimited", decoder={"columns": ["a", "a"]}), "ports.gps.decoder.columns"),
    (port(format="delimited", decoder={"columns": ["a"], "separator": ""}),
     "ports.gps.decoder.separator"),
    (port(format="delimited", decoder={"columns": ["a"], "fields": {"b": {}}}),
     "ports.gps.decoder.fields.b"),
    (port(format="jsonl", decoder={"fields": {"t": {"kind": "int"}}}),
     "ports.gps.decoder.fields.t.kind"),
    (port(format="jsonl", decoder={"fields": {"t": {"scale": "2"}}}),
     "ports.gps.decoder.fields.t.scale"),
    (port(format="jsonl", decoder={"fields": {"t": {"units": "Cel"}}}),
     "ports.gps.decoder.fields.t.units"),
    (port(format="jsonl", decoder={"fields": []}), "ports.gps.decoder.fields"),
    (port(maxLine=4), "ports.gps.maxLine"),
    (port(terminator="crlf"), "ports.gps.terminator"),
    (port(reconnectMin=0), "ports.gps.reconnectMin"),
    (port(reconnectMin=5, reconnectMax=1), "ports.gps.reconnectMax"),
    (port(silenceTimeout=-1), "ports.gps.silenceTimeout"),
    (port(sensor=""), "ports.gps.sensor"),
    (port(enabled=1), "ports.gps.enabled"),
])
def test_invalid_config_names_the_key_path(desired: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(desired)
    assert info.value.path == path


def test_two_enabled_ports_on_one_path_are_refused() -> None:
    desired: dict[str, Any] = {"ports": {"a": {"path": BY_ID}, "b": {"path": BY_ID}}}
    with pytest.raises(ConfigError) as info:
        parse_config(desired)
    assert info.value.path == "ports.b.path"
    desired["ports"]["b"]["enabled"] = False
    assert set(parse_config(desired).ports) == {"a", "b"}


def test_same_link_separates_reopening_changes_from_decoding_changes() -> None:
    base = parse_config(port()).ports["gps"]
    assert base.same_link(parse_config(port(format="jsonl", sensor="x", maxLine=99)).ports["gps"])
    for change in ({"baud": 4800}, {"path": BY_ID + "x"}, {"reconnectMax": 3}, {"enabled": False},
                   {"silenceTimeout": 5}, {"parity": "O"}):
        assert not base.same_link(parse_config(port(**change)).ports["gps"]), change


def test_config_is_frozen() -> None:
    cfg = parse_config(port()).ports["gps"]
    with pytest.raises(AttributeError):
        cfg.sensor = "other"  # type: ignore[misc]
