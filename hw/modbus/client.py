"""Modbus TCP and RTU transports: the only module that imports pymodbus.

pymodbus types never leave this module: reads return plain lists, failures become one of
three :class:`gateway.errors.DeviceError` subclasses that the scheduler understands:

* :class:`LinkError`: the bus itself is unusable (port missing, connection refused or lost);
* :class:`NoResponse`: the unit did not answer (or answered garbage) within the timeout;
* :class:`ExceptionResponse`: the unit answered with a Modbus exception (it is alive).

pymodbus retries are switched off (the breaker decides what a failure means), as is its own
reconnect loop (the bus runner reconnects with its own back-off), and its per-request
"No response received" error log is filtered: the bridge logs unit transitions once instead.
Its "Failed to connect <reason>" warning is taken off the log too: the reason goes into the
:class:`LinkError` of that connect, so the caller says why in one line.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from gateway.errors import DeviceError
from hw.modbus.config import Link, SerialLink, TcpLink
from hw.modbus.registers import MAX_READ_BITS, MAX_READ_REGISTERS, MAX_WRITE_REGISTERS, Table

# Modbus Application Protocol V1.1b3 §7: exception codes
EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "server device failure", 5: "acknowledge", 6: "server device busy",
    8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class LinkError(DeviceError):
    """The bus (serial port or TCP connection) failed."""


class NoResponse(DeviceError):
    """The unit did not answer in time, or its answer was unusable."""


class ExceptionResponse(DeviceError):
    """The unit answered with Modbus exception ``code`` (§7)."""

    def __init__(self, code: int, *, device_id: str = "") -> None:
        self.exception_code = code
        self.meaning = EXCEPTION_NAMES.get(code, f"exception {code}")
        super().__init__(f"exception {code} ({self.meaning})", device_id=device_id)


_CONNECT_FAILURES: ContextVar[list[str] | None] = ContextVar("modbus_connect_failures",
                                                             default=None)
_FAILED_TO_CONNECT = "Failed to connect"


class _DropPerRequestErrors(logging.Filter):
    """pymodbus logs every unanswered request at ERROR with a frame dump; a dead unit would
    flood the journal. The bridge reports "unit N down/recovered" once instead. A failed
    connect's reason is handed to the :meth:`Transport.connect` of the same task."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        failures = _CONNECT_FAILURES.get()
        if failures is not None and text.startswith(_FAILED_TO_CONNECT):
            failures.append(text[len(_FAILED_TO_CONNECT):].strip())
            return False
        return not text.startswith(("No response received", "ERROR: No resp",
                                    "Not connected, trying"))


_FILTER = _DropPerRequestErrors()


def _install_log_filter() -> None:
    logger = logging.getLogger("pymodbus.logging")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


ByteCounter = Callable[[bool, int], None]
"""``counter(sending, nbytes)``: called for every chunk put on or taken off the wire."""


class Transport:
    """One connection to one bus (a serial line or a TCP endpoint), shared by every unit on
    it. Not re-entrant: the bus runner issues one request at a time."""

    def __init__(self, link: Link, *, timeout: float, on_bytes: ByteCounter | None = None,
                 max_no_responses: int = 8) -> None:
        _install_log_filter()
        self.link = link
        self.timeout = timeout
        self._on_bytes = on_bytes

        def trace(sending: bool, data: bytes) -> bytes:
            if self._on_bytes is not None and data:
                self._on_bytes(sending, len(data))
            return data

        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if isinstance(link, TcpLink):
            self._client = AsyncModbusTcpClient(
                link.host, port=link.port, timeout=timeout, retries=0, reconnect_delay=0,
                trace_packet=trace)
        else:
            assert isinstance(link, SerialLink)
            self._client = AsyncModbusSerialClient(
                link.port, baudrate=link.baud, parity=link.parity, stopbits=link.stopbits,
                bytesize=link.bytesize, timeout=timeout, retries=0, reconnect_delay=0,
                trace_packet=trace)
        # Over TCP pymodbus drops the connection after this many unanswered requests in a row
        # (any unit): a silent endpoint. One dead unit among live ones never gets there.
        self._client.set_max_no_responses(max_no_responses)

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    async def connect(self) -> None:
        failures: list[str] = []
        token = _CONNECT_FAILURES.set(failures)
        error: str | None = None
        try:
            ok = await self._client.connect()
        except Exception as exc:  # noqa: BLE001 - OSError, termios.error, SerialException...
            # pymodbus 3.16's serial transport can fail after it opened the port (a parity the
            # line refuses) and never closes it: the open port, with its exclusive lock, lives
            # on in the exception's frames, in a cycle with the failed task. Let go of the
            # exception and collect, so pyserial closes it and the next connect can open it.
            error, ok = str(exc), False
        finally:
            _CONNECT_FAILURES.reset(token)
        if error is not None:
            gc.collect()
            raise LinkError(f"{self.link.describe()}: cannot connect: {error}")
        if not ok:
            reason = failures[-1] if failures else ""
            raise LinkError(f"{self.link.describe()}: cannot connect: "
                            f"{reason or f'no connection within {self.timeout:g} s'}")

    def close(self) -> None:
        self._client.close()

    async def _call(self, request: Callable[[], Awaitable[ModbusPDU]]) -> ModbusPDU:
        if not self.connected:
            raise LinkError(f"{self.link.describe()}: not connected")
        try:
            response = await request()
        except ModbusIOException:
            if not self.connected:
                raise LinkError(f"{self.link.describe()}: connection lost") from None
            raise NoResponse(f"no response within {self.timeout:g} s") from None
        except ConnectionException as exc:
            raise LinkError(f"{self.link.describe()}: {exc}") from None
        except ModbusException as exc:  # a malformed or mismatched answer
            raise NoResponse(f"bad response: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the port itself failed (OSError, termios...)
            raise LinkError(f"{self.link.describe()}: {exc}") from None
        assert isinstance(response, ModbusPDU)
        if response.isError():
            raise ExceptionResponse(int(getattr(response, "exception_code", 0)))
        return response

    async def read(self, table: Table, unit: int, address: int,
                   count: int) -> list[int] | list[bool]:
        """Read ``count`` registers (or bits) of ``table`` (FC 1-4)."""
        if not 1 <= count <= (MAX_READ_BITS if table.is_bits else MAX_READ_REGISTERS):
            raise ValueError(f"count {count} out of range for {table}")
        c = self._client
        if table is Table.HOLDING:
            r = await self._call(lambda: c.read_holding_registers(address, count=count,
                                                                  device_id=unit))
        elif table is Table.INPUT:
            r = await self._call(lambda: c.read_input_registers(address, count=count,
                                                                device_id=unit))
        elif table is Table.COIL:
            r = await self._call(lambda: c.read_coils(address, count=count, device_id=unit))
        else:
            r = await self._call(lambda: c.read_discrete_inputs(address, count=count,
                                                                device_id=unit))
        if table.is_bits:
            bits = [bool(b) for b in r.bits[:count]]
            if len(bits) < count:
                raise NoResponse(f"short answer: {len(bits)} of {count} bits")
            return bits
        registers = list(r.registers)
        if len(registers) != count:
            raise NoResponse(f"short answer: {len(registers)} of {count} registers")
        return registers

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        """FC 6 for one register, FC 16 for several (§6.6, §6.12)."""
        if not 1 <= len(values) <= MAX_WRITE_REGISTERS:
            raise ValueError(f"1..{MAX_WRITE_REGISTERS} registers per write")
        c = self._client
        if len(values) == 1:
            await self._call(lambda: c.write_register(address, values[0], device_id=unit))
        else:
            await self._call(lambda: c.write_registers(address, list(values), device_id=unit))

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        """FC 5 (§6.5)."""
        c = self._client
        await self._call(lambda: c.write_coil(address, value, device_id=unit))
