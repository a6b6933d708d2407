"""The pure half of hotplug: udev properties -> device, rules -> the rule a device belongs to."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ConfigError
from hw.hotplug import MatchRule, UsbSerialDevice, match, parse_rule
from tests.hw.hotplug.devices import CH340, FTDI_A000, TTYS0, UBLOX7, properties


def device(record: str) -> UsbSerialDevice:
    found = UsbSerialDevice.from_udev(*properties(record))
    assert found is not None
    return found


def test_ftdi_properties_give_ids_serial_links_and_the_by_id_path() -> None:
    ftdi = device(FTDI_A000)
    ids = (ftdi.vendor_id, ftdi.model_id, ftdi.serial, ftdi.interface)
    assert ids == ("0403", "6001", "A000", "00")
    assert ftdi.dev_node == "/dev/ttyUSB0"
    assert ftdi.stable_path == "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A000-if00-port0"
    assert ftdi.sys_path.endswith("/1-2:1.0/ttyUSB0/tty/ttyUSB0")
    assert ftdi.describe() == "/dev/ttyUSB0 (0403:6001 serial A000)"


def test_adapters_without_a_serial_number_have_none() -> None:
    ch340 = device(CH340)
    assert ch340.serial is None and (ch340.vendor_id, ch340.model_id) == ("1a86", "7523")
    assert device(UBLOX7).serial is None


def test_non_usb_ttys_are_not_usb_serial_devices() -> None:
    assert UsbSerialDevice.from_udev(*properties(TTYS0)) is None
    sys_path, props = properties(FTDI_A000)
    assert UsbSerialDevice.from_udev(sys_path, {**props, "SUBSYSTEM": "usb-serial"}) is None
    assert UsbSerialDevice.from_udev(sys_path, {**props, "ID_VENDOR_ID": "zz"}) is None
    del props["DEVNAME"]
    assert UsbSerialDevice.from_udev(sys_path, props) is None


def test_stable_path_prefers_by_id_then_gateway_then_by_path_then_the_node() -> None:
    base = device(FTDI_A000)
    by_id = "/dev/serial/by-id/usb-x-if00"
    ours = "/dev/gateway/ftdi-A000-if00"
    by_path = "/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0"
    for links, expected in [
        ((by_path, ours, by_id), by_id),
        ((by_path, ours), ours),
        ((by_path,), by_path),
        ((), "/dev/ttyUSB0"),
    ]:
        assert dataclasses.replace(base, links=links).stable_path == expected


def test_the_most_specific_matching_rule_wins() -> None:
    any_ftdi = MatchRule(name="any-ftdi", vendor_id="0403")
    ft232r = MatchRule(name="ft232r", vendor_id="0403", model_id="6001")
    this_one = MatchRule(name="meter", vendor_id="0403", serial="A000")
    exact = MatchRule(name="exact", vendor_id="0403", model_id="6001", serial="A000")
    gps = MatchRule(name="gps", vendor_id="1546", model_id="01a7")
    ftdi = device(FTDI_A000)
    assert match([any_ftdi], ftdi) == any_ftdi
    assert match([any_ftdi, ft232r], ftdi) == ft232r
    assert match([ft232r, this_one], ftdi) == ft232r  # equally specific: the first
    assert match([this_one, ft232r], ftdi) == this_one
    assert match([any_ftdi, exact, ft232r], ftdi) == exact
    assert match([gps], ftdi) is None
    assert match([gps, any_ftdi], device(UBLOX7)) == gps
    assert match([this_one], device(CH340)) is None
    assert match([], ftdi) is None


def test_serial_numbers_compare_exactly_ids_without_case() -> None:
    ftdi = device(FTDI_A000)
    assert not MatchRule(name="x", serial="a000").matches(ftdi)
    assert MatchRule(name="x", serial="A000").matches(ftdi)
    assert parse_rule("x", {"vendorId": "0403", "modelId": "6001"}, "p").matches(ftdi)
    assert parse_rule("x", {"vendorId": "0403", "modelId": "6001"}, "p") == parse_rule(
        "x", {"vendorId": "0403", "modelId": "6001".upper()}, "p")


@pytest.mark.parametrize(("raw", "path"), [
    ({}, "p"),
    ("0403", "p"),
    ({"vendorId": "04031"}, "p"),
    ({"vendorId": ""}, "p.vendorId"),
    ({"vendorId": 403}, "p.vendorId"),
    ({"idVendor": "0403"}, "p.idVendor"),
])
def test_invalid_rules_name_their_key_path(raw: object, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rule("x", raw, "p")
    assert info.value.path == path


CRITERIA = st.tuples(
    st.sampled_from([None, "0403", "1a86"]),
    st.sampled_from([None, "6001", "7523"]),
    st.sampled_from([None, "A000", "B111"]),
).filter(lambda c: c != (None, None, None))
RULES = st.lists(
    st.tuples(st.sampled_from("abcd"), CRITERIA).map(
        lambda r: MatchRule(name=r[0], vendor_id=r[1][0], model_id=r[1][1], serial=r[1][2])),
    max_size=6,
)


@given(rules=RULES)
def test_match_returns_a_matching_rule_no_less_specific_than_any_other(
    rules: list[MatchRule],
) -> None:
    ftdi = device(FTDI_A000)
    best = match(rules, ftdi)
    matching = [r for r in rules if r.matches(ftdi)]
    if not matching:
        assert best is None
        return
    assert best in matching
    assert best.specificity == max(r.specificity for r in matching)
    assert best is next(r for r in matching if r.specificity == best.specificity)


def test_a_rule_needs_a_criterion() -> None:
    with pytest.raises(ValueError):
        MatchRule(name="x")
