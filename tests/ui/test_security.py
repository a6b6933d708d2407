"""The web page's security core, pure: login rate limits, sessions and their expiry, CSRF."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.ui.security import (
    RateLimiter,
    Sessions,
    check_password,
    csrf_ok,
    password_stamp,
    read_admin,
    write_admin,
)


def test_rate_limit_per_address_and_overall() -> None:
    r = RateLimiter(per_address=3, overall=5, window=60)
    for _ in range(3):
        assert r.blocked("a", 0) == 0
        r.failed("a", 0)
    assert r.blocked("a", 1) == pytest.approx(59)
    assert r.blocked("b", 1) == 0  # another address is not held back by a's failures ...
    r.failed("b", 1)
    r.failed("c", 1)
    assert r.blocked("d", 2) > 0  # ... until the overall limit is reached
    assert r.blocked("a", 61) == 0  # the window slides
    r.succeeded("b")
    assert "b" not in r._by_address


def test_rate_limiter_memory_is_bounded() -> None:
    r = RateLimiter(per_address=3, overall=10**9, window=60, max_addresses=100)
    for i in range(1000):
        r.failed(f"10.0.{i // 256}.{i % 256}", 0)
    assert len(r._by_address) <= 100


def test_sessions_expire_idle_and_absolute_and_are_bounded() -> None:
    s = Sessions(idle=10, absolute=100, max_sessions=3)
    a = s.create("admin", 0)
    assert s.get(a.sid, 5) is a and s.get(a.sid, 14) is a  # use keeps it alive
    assert s.get(a.sid, 30) is None  # idle too long
    b = s.create("admin", 0)
    for t in range(5, 100, 5):
        assert s.get(b.sid, t) is b
    assert s.get(b.sid, 101) is None  # absolute limit, however busy
    ids = {s.create("admin", 200).sid for _ in range(5)}
    assert len(s._by_id) == 3 and len(ids) == 5
    assert s.get(None, 200) is None and s.get("forged", 200) is None


def test_csrf_token_is_per_session() -> None:
    s = Sessions()
    a, b = s.create("admin", 0), s.create("admin", 0)
    assert a.csrf != b.csrf and a.sid != b.sid
    assert csrf_ok(a, a.csrf) and not csrf_ok(a, b.csrf) and not csrf_ok(a, None)
    assert not csrf_ok(a, "")


def test_admin_file(tmp_path: Path) -> None:
    assert read_admin(tmp_path) is None and not check_password(tmp_path, "anything")
    with pytest.raises(ConfigError):
        write_admin(tmp_path, "short", ln=10)
    write_admin(tmp_path, "a good password", ln=10)
    assert check_password(tmp_path, "a good password")
    assert not check_password(tmp_path, "a good passwore")
    (tmp_path / "admin.json").write_text('{"scheme": "plain", "password_hash": "x"}')
    assert read_admin(tmp_path) is None  # an unknown scheme is no password at all
    (tmp_path / "admin.json").write_text("not json")
    assert read_admin(tmp_path) is None


def test_a_new_password_ends_the_sessions_of_the_old_one() -> None:
    sessions = Sessions()
    old, new = password_stamp("$scrypt$old"), password_stamp("$scrypt$new")
    a = sessions.create("admin", 0.0, stamp=old, address="10.0.0.2")
    b = sessions.create("admin", 1.0, stamp=old, address="10.0.0.3")
    assert sessions.get(a.sid, 2.0, stamp=old) is a
    assert sessions.get(a.sid, 3.0, stamp=new) is None  # the password changed: gone for good
    assert sessions.get(a.sid, 4.0, stamp=old) is None
    assert [s.address for s in sessions.all(5.0)] == ["10.0.0.3"]
    c = sessions.create("admin", 6.0, stamp=new)
    assert sessions.end_others(c.sid) == 1 and sessions.get(b.sid, 7.0) is None
    assert sessions.all(8.0) == [c] and c.public_id not in c.sid and len(c.public_id) == 12
    assert password_stamp(None) != old
