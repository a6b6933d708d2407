"""gateway.mqtt is sans-I/O: importing it pulls in no asyncio, sockets, sqlite or threads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gateway_mqtt_imports_no_io_modules() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import gateway.mqtt\n"
        "banned = {'asyncio', 'socket', 'ssl', 'sqlite3', 'selectors', 'threading'}\n"
        "print(sorted(banned & (set(sys.modules) - before)))\n"
        "print('gateway.mqtt.session' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["[]", "True"]
