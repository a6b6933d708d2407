"""The bus transport over a real pseudo-terminal."""

from __future__ import annotations

import os
import pty

import pytest

from hw.modbus.client import LinkError, Transport
from hw.modbus.config import SerialLink


async def test_a_refused_serial_setting_leaves_the_port_free_for_the_next_connect() -> None:
    """A pty refuses even parity after pymodbus opened it (exclusively): the failed connect
    must not keep the port, or every later connect fails with "could not exclusively lock"."""
    controller, line = pty.openpty()
    try:
        path = os.ttyname(line)
        refused = Transport(SerialLink(port=path, baud=9600, parity="E"), timeout=1)
        with pytest.raises(LinkError, match="cannot connect"):
            await refused.connect()
        refused.close()
        plain = Transport(SerialLink(port=path, baud=9600, parity="N"), timeout=1)
        await plain.connect()
        assert plain.connected
        plain.close()
    finally:
        os.close(controller)
        os.close(line)
