"""The decoders are sans-I/O: importing them pulls in no event loop, ports, udev or threads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_framing_and_nmea_import_no_io_modules() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import hw.serial.framing, hw.serial.nmea\n"
        "banned = {'asyncio', 'socket', 'selectors', 'threading', 'termios', 'serial', 'pyudev',\n"
        "          'hw.serial.port', 'hw.hotplug'}\n"
        "print(sorted(banned & (set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["[]"]


def test_only_port_imports_pyserial() -> None:
    sources = sorted((REPO / "hw" / "serial").glob("*.py")) + [REPO / "hw" / "hotplug.py"]
    importers = [
        p.relative_to(REPO).as_posix() for p in sources
        if any(line.startswith(("import serial", "from serial"))
               for line in p.read_text().splitlines())
    ]
    assert importers == ["hw/serial/port.py"]
