"""The systemd units: systemd-analyze verify (any output fails: it exits 0 on unknown keys,
appliance.md §2.1) and the offline security exposure of gateway.service (at most 2.5)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.hubproc import REPO

UNITS = REPO / "systemd"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (dev.sh installs systemd)")


def exposure(unit: Path) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out)
    assert m, out
    return float(m.group(1))


def test_gateway_service_exposure_at_most_2_5() -> None:
    assert exposure(UNITS / "gateway.service") <= 2.5
    run = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=25",
                          str(UNITS / "gateway.service")], check=False, capture_output=True)
    assert run.returncode == 0


def test_exposure_gate_can_fail(tmp_path: Path) -> None:
    weak = tmp_path / "gateway.service"
    text = (UNITS / "gateway.service").read_text()
    weak.write_text(re.sub(r"^(CapabilityBoundingSet|ProtectSystem|SystemCallFilter)=.*\n", "",
                           text, flags=re.MULTILINE))
    assert exposure(weak) > 2.5


def test_units_verify_clean(tmp_path: Path) -> None:
    # ExecStart's venv exists only in the image (the image tier verifies against its rootfs).
    for name in ("gateway.service", "gateway-firstboot.service"):
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", text,
                                            flags=re.MULTILINE))
    out = subprocess.run(["systemd-analyze", "verify", "gateway.service",
                          "gateway-firstboot.service"], cwd=tmp_path, check=False, capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout + out.stderr == ""


def test_the_hardening_the_issue_names() -> None:
    text = (UNITS / "gateway.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.MULTILINE))
    assert settings["Type"] == "notify" and int(settings["WatchdogSec"]) > 0
    assert settings["StateDirectory"] == "gateway"
    assert settings["ProtectSystem"] == "strict" and settings["ProtectHome"] == "yes"
    assert settings["PrivateTmp"] == "yes" and settings["NoNewPrivileges"] == "yes"
    assert settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert set(settings["SupplementaryGroups"].split()) == {"dialout", "bluetooth"}
    families = set(settings["RestrictAddressFamilies"].split())
    assert {"AF_BLUETOOTH", "AF_UNIX", "AF_NETLINK"} <= families
    assert settings["DevicePolicy"] == "closed" and settings["OOMPolicy"] == "continue"
