"""Logging: one line per event with ``key=value`` context, to stderr or to the journal.

Every log line of the hub and the bridges carries its context as ``key=value`` pairs
(``connection refused client_id='boiler-1' peer=... reason=bad signature``). Under systemd
(``$JOURNAL_STREAM`` names our stderr) and with systemd-python installed, lines go to the
journal through ``systemd.journal.send`` instead, with each pair also as a journal field
(``CLIENT_ID=boiler-1``, ``REASON=bad signature``) and the device and module named in
``DEVICE_ID=``/``MODULE_ID=``, so ``journalctl -u gateway DEVICE_ID=boiler-1`` shows one
device's lines. :func:`context_fields` is the pure part.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Keys whose value is free text running to "; " or the end of the line (reasons quote
# protocol text, which may itself hold "x=y"), so they come last in a line.
_TEXT_KEYS = frozenset({"reason", "error"})
_PAIR = re.compile(r"(?:^|(?<=[\s(]))([a-z][a-z0-9_]*)=")
_RESERVED = frozenset({"MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE",
                       "CODE_FUNC", "SYSLOG_IDENTIFIER", "SYSLOG_FACILITY", "SYSLOG_PID",
                       "ERRNO", "LOGGER", "THREAD_NAME", "INVOCATION_ID", "UNIT"})
# Keys naming an IoT Hub identity: a client id or module path is "device" or "device/module".
_IDENTITY_KEYS = ("client_id", "device_id", "device", "module", "twin")
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def context_fields(message: str) -> dict[str, str]:
    """The ``key=value`` pairs of a log line as journal fields (pure).

    >>> context_fields("connection refused client_id='gw/modbus' reason=bad signature")
    {'CLIENT_ID': 'gw/modbus', 'REASON': 'bad signature', 'DEVICE_ID': 'gw', 'MODULE_ID': 'modbus'}
    """
    matches = list(_PAIR.finditer(message))
    raw: dict[str, str] = {}
    skip_to = 0
    for i, m in enumerate(matches):
        key, start = m.group(1), m.end()
        if start <= skip_to:
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(message)
        chunk = message[start:end]
        if key in _TEXT_KEYS and chunk[:1] not in ("'", '"'):
            chunk = message[start:].split("; ", 1)[0]
            skip_to = start + len(chunk)
        if chunk[:1] in ("'", '"'):
            close = chunk.find(chunk[0], 1)
            value = chunk[: close + 1] if close > 0 else chunk.split(None, 1)[0] if chunk else ""
        elif key in _TEXT_KEYS:
            value = chunk.split("; ", 1)[0].rstrip()
        else:
            value = chunk.split(None, 1)[0] if chunk.strip() else ""
            value = value.split(";", 1)[0].rstrip(",:)")
        value = _unquote(value)
        if value and key not in raw:
            raw[key] = value
    fields = {}
    for key, value in raw.items():
        name = key.upper()
        fields[f"GW_{name}" if name in _RESERVED else name] = value
    for key in _IDENTITY_KEYS:
        if key in raw and raw[key] != "None":
            device, _, module = raw[key].partition("/")
            if key == "module" and not module:  # "module=NAME": a module of the gateway device
                fields.setdefault("MODULE_ID", device)
                continue
            fields.setdefault("DEVICE_ID", device)
            if module:
                fields.setdefault("MODULE_ID", module)
    return fields


class JournalHandler(logging.Handler):
    """Sends records to the journal with their context as fields (systemd.journal.send)."""

    def __init__(self, send: Callable[..., Any], identifier: str) -> None:
        super().__init__()
        self._send = send
        self.identifier = identifier

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The journal fields besides MESSAGE (CODE_LINE an int: journal.send formats it)."""
        return {"PRIORITY": str(_PRIORITY.get(record.levelno, 6)), "LOGGER": record.name,
                "SYSLOG_IDENTIFIER": self.identifier, "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno, "CODE_FUNC": record.funcName,
                **context_fields(record.getMessage())}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(message, **self.fields(record))
        except Exception:  # noqa: BLE001  # pragma: no cover - logging must never raise
            self.handleError(record)


def journal_send() -> Callable[..., Any] | None:
    """``systemd.journal.send`` when our stderr is the journal and systemd-python is here."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return None
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return None
    if stream != f"{st.st_dev}:{st.st_ino}":
        return None
    try:
        from systemd import journal  # type: ignore[import-not-found,attr-defined,unused-ignore]
    except ImportError:
        return None
    send: Callable[..., Any] = journal.send
    return send


def setup(level: str, *, identifier: str = "gateway") -> None:
    """Log at ``level`` to the journal (structured) when run by systemd, else to stderr."""
    send = journal_send()
    handler: logging.Handler
    if send is not None:
        handler = JournalHandler(send, identifier)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
