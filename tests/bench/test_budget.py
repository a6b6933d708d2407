"""tests/bench/budget.py's accounting: samples sorted into steps, scaled to CPU per message."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.budget import LOOP, budget

LOOP_TOP = "Runner.run (asyncio/runners.py:118)"
DB_TOP = "Thread.run (threading.py:982);Database._main (gateway/store/db.py:244)"


def test_samples_are_sorted_by_their_innermost_step_and_scaled(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text("\n".join([
        f"{LOOP_TOP} 30",  # uvloop's own C code
        f"{LOOP_TOP};MqttConnection.data_received (gateway/broker/connection.py:120);"
        "ServerSession.receive (gateway/mqtt/session.py:212) 20",
        f"{LOOP_TOP};MqttConnection.data_received (gateway/broker/connection.py:120);"
        "MqttConnection._on_publish (gateway/broker/connection.py:194);"
        "Hub.handle_publish (gateway/hub/hub.py:241);Hub.telemetry_record (gateway/hub/hub.py:270);"
        "Router.route (gateway/routing/router.py:160) 25",
        f"{LOOP_TOP};_WriteBody.settle (gateway/store/log.py:160);"
        "MqttConnection._drain_acks (gateway/broker/connection.py:340);"
        "MqttConnection.flush (gateway/broker/connection.py:395) 25",
        f"{DB_TOP};Database._transact (gateway/store/db.py:350);"
        "insert (gateway/store/_log_sql.py:80) 3",
        f"{DB_TOP};Database._transact (gateway/store/db.py:350) 1",
    ]) + "\n")
    steps = budget(raw, main_us=10.0, db_us=4.0)
    assert steps[LOOP] == pytest.approx(3.0)
    assert steps["read: MQTT decode and session"] == pytest.approx(2.0)
    assert steps["routing (route conditions)"] == pytest.approx(2.5)  # inside telemetry_record
    assert steps["PUBACK write (send system call)"] == pytest.approx(2.5)
    assert steps["store thread: INSERT (executemany)"] == pytest.approx(3.0)
    assert steps["store thread: transaction, COMMIT and fsync"] == pytest.approx(1.0)
    assert sum(steps.values()) == pytest.approx(14.0)
