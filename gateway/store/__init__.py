"""The durable store: one SQLite writer thread with group commit (:mod:`.db`) and the message
log with per-consumer cursors and retention (:mod:`.log`)."""

from gateway.store.db import Database, Migration
from gateway.store.log import Entry, LogStats, MessageLog, PruneResult, Record

__all__ = ["Database", "Entry", "LogStats", "MessageLog", "Migration", "PruneResult", "Record"]
