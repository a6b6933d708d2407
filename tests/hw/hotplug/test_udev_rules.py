"""hw/udev/60-gateway-serial.rules: lint, and the names it gives recorded adapters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.hw.hotplug.devices import CH340, FTDI_A000, TTYS0, UBLOX7, chain, parse
from tests.hw.hotplug.udevrules import Outcome, RuleError, evaluate, parse_rules

RULES_FILE = Path(__file__).resolve().parents[3] / "hw" / "udev" / "60-gateway-serial.rules"
RULES = parse_rules(RULES_FILE.read_text())


def outcome(record: str, action: str = "add") -> Outcome:
    return evaluate(RULES, chain(record), action)


def variant(record: str, **env: str) -> str:
    """The record with some udev properties of its tty replaced."""
    head, _, tty = record.rpartition("\n\n")
    for key, value in env.items():
        tty = re.sub(rf"^E: {key}=.*$", f"E: {key}={value}", tty, flags=re.MULTILINE)
    return f"{head}\n\n{tty}"


def test_ftdi_with_a_serial_number_is_named_by_it() -> None:
    got = outcome(FTDI_A000)
    assert got.symlinks == ["gateway/ftdi-A000-if00"]
    assert (got.group, got.mode, got.tags) == ("dialout", "0660", {"systemd"})
    assert got.env == {"GATEWAY_SERIAL_KIND": "ftdi", "ID_GATEWAY_PORT": "1"}


def test_adapters_without_a_serial_number_are_named_by_their_usb_socket() -> None:
    assert outcome(CH340).symlinks == ["gateway/ch34x-path-pci-0000_00_14_0-usb-0_4_1_0-if00"]
    assert outcome(UBLOX7).symlinks == ["gateway/ublox-path-pci-0000_00_14_0-usb-0_3_1_0-if00"]


def test_two_ch340s_collide_in_by_id_but_not_in_our_names() -> None:
    other = variant(CH340, ID_PATH_TAG="pci-0000_00_14_0-usb-0_5_1_0")
    assert parse(CH340)[-1].links[0] == parse(other)[-1].links[0]  # same by-id link
    assert outcome(CH340).symlinks != outcome(other).symlinks


def test_two_ftdis_get_two_names_and_unknown_vendors_a_generic_kind() -> None:
    other = variant(FTDI_A000, ID_SERIAL_SHORT="B111")
    assert outcome(other).symlinks == ["gateway/ftdi-B111-if00"]
    unknown = variant(FTDI_A000, ID_VENDOR_ID="abcd", ID_MODEL_ID="1234")
    assert outcome(unknown).symlinks == ["gateway/usb-abcd-1234-A000-if00"]


def test_second_port_of_a_dual_adapter_gets_its_own_name() -> None:
    second = variant(FTDI_A000, ID_USB_INTERFACE_NUM="01")
    assert outcome(second).symlinks == ["gateway/ftdi-A000-if01"]


def test_on_board_uarts_and_removals_are_left_alone() -> None:
    assert outcome(TTYS0) == Outcome()
    assert outcome(FTDI_A000, action="remove") == Outcome()


def test_link_names_use_only_safe_characters() -> None:
    for record in (FTDI_A000, CH340, UBLOX7):
        for link in outcome(record).symlinks:
            assert re.fullmatch(r"gateway/[A-Za-z0-9._-]+", link), link


@pytest.mark.parametrize(("text", "problem"), [
    ('SUBSYSTEMS=="usb", ATTRS{idVendor}="0403", SYMLINK+="x"', "invalid operator = for ATTRS"),
    ('KERNEL=="ttyUSB*" GROUP="dialout"', "a comma between tokens is expected"),
    ('KERNAL=="ttyUSB*", GROUP="dialout"', "unknown key KERNAL"),
    ('ENV=="x"', "ENV needs {}"),
    ('GOTO="nowhere"', "has no LABEL after it"),
    ('LABEL="back"\nGOTO="back"', "has no LABEL after it"),
    ('KERNEL=="ttyUSB*", GROUP="dialout', "cannot parse"),
])
def test_the_linter_rejects_what_udev_rejects(text: str, problem: str) -> None:
    with pytest.raises(RuleError, match=re.escape(problem)):
        parse_rules(text)


def test_the_evaluator_walks_parents_for_attrs() -> None:
    rules = parse_rules('SUBSYSTEMS=="usb", ATTRS{idVendor}=="0403", SYMLINK+="ftdi-$attr{dev}"\n'
                        'ATTRS{idVendor}=="1a86", SYMLINK+="never"')
    assert evaluate(rules, chain(FTDI_A000)).symlinks == ["ftdi-188:0"]
