"""An in-memory ring of the hub's recent log records, for the UI's live log tail."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

_DEVICE = re.compile(r"\b(?:device(?:_id)?=|client_id=')([^\s,'/]+)")
_MODULE = re.compile(r"\b(?:module(?:_id)?=|client_id='[^\s,'/]+/)([^\s,']+)")


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    time: float
    level: str
    levelno: int
    logger: str
    message: str
    device: str
    module: str

    def json(self) -> dict[str, object]:
        return {"seq": self.seq, "time": time.strftime("%H:%M:%S", time.localtime(self.time)),
                "level": self.level, "logger": self.logger, "message": self.message,
                "device": self.device, "module": self.module}


class RingHandler(logging.Handler):
    """Keeps the last ``size`` records; readers page by sequence number."""

    def __init__(self, size: int = 2000) -> None:
        super().__init__(logging.DEBUG)
        self._ring: deque[Record] = deque(maxlen=size)
        self._seq = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        device = _DEVICE.search(message)
        module = _MODULE.search(message)
        with self._guard:
            self._seq += 1
            self._ring.append(Record(self._seq, record.created, record.levelname, record.levelno,
                                     record.name, message[:2000],
                                     device.group(1) if device else "",
                                     module.group(1) if module else ""))

    @property
    def last_seq(self) -> int:
        return self._seq

    def since(self, seq: int, *, level: int = 0, device: str = "", module: str = "",
              limit: int = 500) -> list[Record]:
        with self._guard:
            records = [r for r in self._ring if r.seq > seq]
        return [r for r in records if r.levelno >= level and (not device or r.device == device)
                and (not module or r.module == module or r.logger.endswith(module))][-limit:]
