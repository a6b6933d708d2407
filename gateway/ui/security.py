"""The UI's security core (pure: no I/O but the admin file): the admin password file, login
rate limits, server-side sessions with expiry and their CSRF tokens.

``DATA_DIR/admin.json`` is ``{"scheme": "scrypt", "password_hash": "$scrypt$ln=15,r=8,p=1$..."}``
(the hash of :func:`gateway.setupfile.admin_hash`), 0600, written by ``gateway admin
set-password`` or by the appliance's first boot. There is no default password: without the
file nobody logs in.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import ConfigError
from gateway.setupfile import admin_hash, verify_admin

ADMIN_FILE = "admin.json"
ADMIN_USER = "admin"
MIN_PASSWORD = 8


def write_admin(data_dir: Path, password: str, *, ln: int = 15) -> Path:
    """Store the admin password's hash in ``data_dir/admin.json`` (0600, atomically)."""
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password must have at least {MIN_PASSWORD} characters")
    path = data_dir / ADMIN_FILE
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"scheme": "scrypt", "password_hash": admin_hash(password, ln=ln)}, fh)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def read_admin(data_dir: Path) -> str | None:
    """The stored hash, or None when no admin password is set (or the file is unusable)."""
    try:
        data = json.loads((data_dir / ADMIN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("scheme") != "scrypt":
        return None
    value = data.get("password_hash")
    return value if isinstance(value, str) and value.startswith("$scrypt$") else None


def check_password(data_dir: Path, password: str) -> bool:
    stored = read_admin(data_dir)
    return stored is not None and verify_admin(password, stored)


@dataclass
class RateLimiter:
    """Failed logins allowed per address and overall within a sliding ``window`` seconds."""

    per_address: int = 5
    overall: int = 20
    window: float = 300.0
    _by_address: dict[str, deque[float]] = field(default_factory=dict)
    _all: deque[float] = field(default_factory=deque)
    max_addresses: int = 4096

    def _trim(self, now: float) -> None:
        while self._all and self._all[0] <= now - self.window:
            self._all.popleft()
        for address in [a for a, q in self._by_address.items() if not q or q[-1] <= now - self.window]:
            del self._by_address[address]
        for q in self._by_address.values():
            while q and q[0] <= now - self.window:
                q.popleft()

    def blocked(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again (0: it may now)."""
        self._trim(now)
        q = self._by_address.get(address)
        if q is not None and len(q) >= self.per_address:
            return q[0] + self.window - now
        if len(self._all) >= self.overall:
            return self._all[0] + self.window - now
        return 0.0

    def failed(self, address: str, now: float) -> None:
        self._trim(now)
        if address not in self._by_address and len(self._by_address) >= self.max_addresses:
            self._by_address.pop(next(iter(self._by_address)))
        self._by_address.setdefault(address, deque()).append(now)
        self._all.append(now)

    def succeeded(self, address: str) -> None:
        self._by_address.pop(address, None)


@dataclass
class Session:
    sid: str
    user: str
    csrf: str
    created: float
    seen: float
    stamp: str = ""  # which password it logged in with (:func:`password_stamp`)
    address: str = ""

    @property
    def public_id(self) -> str:
        """A name for the session list that does not give its cookie away."""
        return hashlib.sha256(self.sid.encode()).hexdigest()[:12]


def password_stamp(stored_hash: str | None) -> str:
    """What ties a session to the password it logged in with: when ``admin.json`` changes
    (``gateway admin set-password``, the System screen), every session of the old password
    ends at its next request (log out everywhere)."""
    return hashlib.sha256((stored_hash or "").encode()).hexdigest()


@dataclass
class Sessions:
    """Server-side sessions: random ids, an idle and an absolute expiry, a bounded count."""

    idle: float = 1800.0
    absolute: float = 12 * 3600.0
    max_sessions: int = 64
    _by_id: dict[str, Session] = field(default_factory=dict)

    def create(self, user: str, now: float, *, stamp: str = "", address: str = "") -> Session:
        self._expire(now)
        while len(self._by_id) >= self.max_sessions:  # the oldest goes
            self._by_id.pop(min(self._by_id.values(), key=lambda s: s.seen).sid)
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now, now,
                          stamp=stamp, address=address)
        self._by_id[session.sid] = session
        return session

    def get(self, sid: str | None, now: float, *, stamp: str | None = None) -> Session | None:
        """The live session of ``sid``; with ``stamp`` (the password in force), a session of
        another password ends here."""
        if not sid:
            return None
        self._expire(now)
        session = self._by_id.get(sid)
        if session is None:
            return None
        if stamp is not None and not hmac.compare_digest(session.stamp, stamp):
            del self._by_id[sid]
            return None
        session.seen = now
        return session

    def all(self, now: float) -> list[Session]:
        self._expire(now)
        return sorted(self._by_id.values(), key=lambda s: s.created)

    def end_others(self, keep: str) -> int:
        """End every session but ``keep``; how many ended."""
        others = [sid for sid in self._by_id if sid != keep]
        for sid in others:
            del self._by_id[sid]
        return len(others)

    def end(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def end_all(self) -> None:
        self._by_id.clear()

    def _expire(self, now: float) -> None:
        for sid in [s.sid for s in self._by_id.values()
                    if now - s.seen > self.idle or now - s.created > self.absolute]:
            del self._by_id[sid]


def csrf_ok(session: Session, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())
