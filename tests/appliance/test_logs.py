"""Structured journal fields from the hub's key=value log lines (gateway/logs.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.logs import JournalHandler, context_fields, journal_send


@pytest.mark.parametrize(("line", "fields"), [
    ("connection refused client_id='boiler-1' peer=10.0.0.9:5123 listener=tls reason=bad "
     + "signature",
     {"CLIENT_ID": "boiler-1", "PEER": "10.0.0.9:5123", "LISTENER": "tls",
      "REASON": "bad signature", "DEVICE_ID": "boiler-1"}),
    ("closing connection client_id='gw/modbus' peer=x reason=topic not allowed for gw: a=b",
     {"CLIENT_ID": "gw/modbus", "PEER": "x", "REASON": "topic not allowed for gw: a=b",
      "DEVICE_ID": "gw", "MODULE_ID": "modbus"}),
    ("module exited module=modbus code=1; restarting in 2 s",
     {"MODULE": "modbus", "CODE": "1", "MODULE_ID": "modbus"}),
    ("hub connection lost client_id=gw/ble reason=gone; retrying in 4 s",
     {"CLIENT_ID": "gw/ble", "REASON": "gone", "DEVICE_ID": "gw", "MODULE_ID": "ble"}),
    ("block refused device=boiler-1 unit=3 error=timeout after 3 s",
     {"DEVICE": "boiler-1", "GW_UNIT": "3", "ERROR": "timeout after 3 s",
      "DEVICE_ID": "boiler-1"}),
    ("connected client_id=None peer=p", {"CLIENT_ID": "None", "PEER": "p"}),
    ("hub ready host_name=gw-7 data_dir=/var/lib/gateway",
     {"HOST_NAME": "gw-7", "DATA_DIR": "/var/lib/gateway"}),
    ("no context here", {}),
])
def test_context_fields(line: str, fields: dict[str, str]) -> None:
    assert context_fields(line) == fields


def test_field_names_are_valid_journal_fields() -> None:
    import re
    fields = context_fields("a message=x priority=y code_file=z x9=1 reason=r")
    assert fields == {"GW_MESSAGE": "x", "GW_PRIORITY": "y", "GW_CODE_FILE": "z", "X9": "1",
                      "REASON": "r"}
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", k) for k in fields)


def test_handler_sends_message_priority_and_fields() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    handler = JournalHandler(lambda msg, **kw: sent.append((msg, kw)), "gateway")
    logger = logging.getLogger("test.journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connection refused client_id=%r reason=%s", "boiler-1", "unknown device")
    finally:
        logger.removeHandler(handler)
    (message, fields), = sent
    assert message == "connection refused client_id='boiler-1' reason=unknown device"
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "gateway"
    assert fields["DEVICE_ID"] == "boiler-1" and fields["REASON"] == "unknown device"
    assert fields["LOGGER"] == "test.journal" and fields["CODE_FUNC"]


def test_journal_only_when_stderr_is_the_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert journal_send() is None
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # some other stream: a redirected stderr
    assert journal_send() is None


def test_cli_logs_to_stderr_with_key_values_outside_systemd(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    code = ("from gateway import logs; import logging; logs.setup('info');"
            "logging.getLogger('gateway.x').info('hub ready host_name=%s', 'gw')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stderr.rstrip().endswith("INFO gateway.x: hub ready host_name=gw")


def test_real_journal_send_accepts_the_fields() -> None:
    journal = pytest.importorskip("systemd.journal")
    errors: list[logging.LogRecord] = []

    class Checked(JournalHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            errors.append(record)

    handler = Checked(journal.send, "gateway-test")
    record = logging.LogRecord("gateway.x", logging.INFO, __file__, 7,
                               "hub ready host_name=%s count=%d", ("gw", 3), None)
    journal.send(record.getMessage(), **handler.fields(record))  # raises on a bad field
    handler.emit(record)
    assert errors == []
