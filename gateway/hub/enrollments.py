"""Enrollment groups and registration records of the hub's provisioning service (ref §12).

A group enrollment admits any device that proves it belongs to the group: with a key derived
from the group's symmetric key (``attestation.type = "symmetricKey"``), or with a certificate
chained to the hub's CA (``attestation.type = "x509"``, ``caReference = "$hub"``). The shapes
are the Device Provisioning Service REST API's (``enrollmentGroupId``, ``attestation``,
``provisioningStatus``, ``capabilities.iotEdge``, ``initialTwin``, ``etag``). Groups and
registrations live in ``hub.db`` and are served from memory.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from gateway.errors import ConflictError, InvalidRequestError, NotFoundError, PreconditionFailedError
from gateway.store.db import Database, Migration

MIGRATION: Final[Migration] = (
    "provisioning",
    (
        """
        CREATE TABLE dps_groups(id TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE dps_registrations(id TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE dps_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        """,
    ),
)

HUB_CA: Final = "$hub"
MAX_GROUPS: Final = 100
_GROUP_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
Attestation = Literal["symmetricKey", "x509"]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e7):07d}Z"


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _etag() -> str:
    return base64.b64encode(secrets.token_bytes(8)).decode("ascii").rstrip("=")


@dataclass(frozen=True, slots=True)
class EnrollmentGroup:
    group_id: str
    attestation: Attestation
    primary_key: str = field(default="", repr=False)
    secondary_key: str = field(default="", repr=False)
    ca_reference: str = HUB_CA
    enabled: bool = True
    iot_edge: bool = False
    initial_tags: Mapping[str, Any] = field(default_factory=dict)
    initial_desired: Mapping[str, Any] = field(default_factory=dict)
    etag: str = ""
    created: float = 0.0
    updated: float = 0.0

    def json(self, *, keys: bool = True) -> dict[str, Any]:
        attestation: dict[str, Any] = {"type": self.attestation}
        if self.attestation == "symmetricKey":
            attestation["symmetricKey"] = (
                {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key}
                if keys else {"primaryKey": None, "secondaryKey": None})
        else:
            attestation["x509"] = {"caReferences": {"primary": self.ca_reference}}
        return {
            "enrollmentGroupId": self.group_id,
            "attestation": attestation,
            "provisioningStatus": "enabled" if self.enabled else "disabled",
            "capabilities": {"iotEdge": self.iot_edge},
            "initialTwin": {"tags": dict(self.initial_tags),
                            "properties": {"desired": dict(self.initial_desired)}},
            "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": True},
            "allocationPolicy": "static",
            "etag": self.etag,
            "createdDateTimeUtc": _iso(self.created),
            "lastUpdatedDateTimeUtc": _iso(self.updated),
        }


def _key(value: Any, what: str) -> str:
    if value is None or value == "":
        return _new_key()
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what} is not valid base64") from None
    if not 16 <= len(raw) <= 64:
        raise InvalidRequestError(f"{what} must decode to 16-64 bytes, not {len(raw)}")
    return value


def parse_group(group_id: str, body: Mapping[str, Any], *, now: float) -> EnrollmentGroup:
    """An enrollment group from its REST body; missing keys are generated."""
    if not _GROUP_ID.match(group_id):
        raise InvalidRequestError(
            f"invalid enrollment group id {group_id!r}: 1-128 letters, digits, '.', '_', '-'")
    if body.get("enrollmentGroupId", group_id) != group_id:
        raise InvalidRequestError("enrollmentGroupId in the body differs from the URL")
    attestation = body.get("attestation") or {"type": "symmetricKey"}
    if not isinstance(attestation, Mapping):
        raise InvalidRequestError("attestation must be an object")
    kind = attestation.get("type")
    status = body.get("provisioningStatus", "enabled")
    if status not in ("enabled", "disabled"):
        raise InvalidRequestError("provisioningStatus must be 'enabled' or 'disabled'")
    twin = body.get("initialTwin") or {}
    if not isinstance(twin, Mapping):
        raise InvalidRequestError("initialTwin must be an object")
    tags = twin.get("tags") or {}
    desired = (twin.get("properties") or {}).get("desired") or {}
    if not isinstance(tags, Mapping) or not isinstance(desired, Mapping):
        raise InvalidRequestError("initialTwin tags and properties.desired must be objects")
    desired = {k: v for k, v in desired.items() if not k.startswith("$")}
    iot_edge = bool((body.get("capabilities") or {}).get("iotEdge", False))
    common = {"enabled": status == "enabled", "iot_edge": iot_edge, "initial_tags": dict(tags),
              "initial_desired": desired, "etag": _etag(), "created": now, "updated": now}
    if kind == "symmetricKey":
        keys = attestation.get("symmetricKey") or {}
        return EnrollmentGroup(group_id, "symmetricKey",
                               primary_key=_key(keys.get("primaryKey"), "primaryKey"),
                               secondary_key=_key(keys.get("secondaryKey"), "secondaryKey"),
                               **common)
    if kind == "x509":
        refs = (attestation.get("x509") or {}).get("caReferences") or {"primary": HUB_CA}
        reference = refs.get("primary", HUB_CA)
        if reference != HUB_CA:
            raise InvalidRequestError(
                f"unsupported CA reference {reference!r}: X.509 groups enroll devices whose "
                f"certificates the hub's own CA issued ({HUB_CA!r})")
        return EnrollmentGroup(group_id, "x509", ca_reference=HUB_CA, **common)
    raise InvalidRequestError(f"attestation.type must be 'symmetricKey' or 'x509', not {kind!r}")


@dataclass(frozen=True, slots=True)
class Registration:
    """What a registration id was provisioned as (the DPS ``registrationState``)."""

    registration_id: str
    group_id: str
    device_id: str
    assigned_hub: str
    status: Literal["assigned", "failed", "disabled"]
    substatus: str = "initialAssignment"
    error: str = ""
    etag: str = ""
    created: float = 0.0
    updated: float = 0.0
    payload: Any = None

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "registrationId": self.registration_id,
            "createdDateTimeUtc": _iso(self.created),
            "status": self.status,
            "lastUpdatedDateTimeUtc": _iso(self.updated),
            "etag": self.etag,
            "enrollmentGroupId": self.group_id,
        }
        if self.status == "assigned":
            out.update({"assignedHub": self.assigned_hub, "deviceId": self.device_id,
                        "substatus": self.substatus})
        if self.error:
            out.update({"errorCode": 401002 if self.status == "disabled" else 400000,
                        "errorMessage": self.error})
        if self.payload is not None:
            out["payload"] = self.payload
        return out


def _group_doc(g: EnrollmentGroup) -> str:
    return json.dumps({**g.json(), "_created": g.created, "_updated": g.updated})


def _group_from_doc(doc: str) -> EnrollmentGroup:
    raw = json.loads(doc)
    group = parse_group(raw["enrollmentGroupId"], raw, now=raw["_created"])
    return replace(group, etag=raw["etag"], created=raw["_created"], updated=raw["_updated"])


class EnrollmentStore:
    """Enrollment groups, registrations and the hub's ID scope, in memory and in hub.db."""

    def __init__(self, db: Database, *, clock: Any = time.time) -> None:
        self._db = db
        self._clock = clock
        self.groups: dict[str, EnrollmentGroup] = {}
        self.registrations: dict[str, Registration] = {}
        self.id_scope = ""

    async def open(self) -> None:
        await self._db.migrate(MIGRATION)

        def load(conn: sqlite3.Connection) -> tuple[list[str], list[str], str]:
            row = conn.execute("SELECT value FROM dps_meta WHERE key = 'id_scope'").fetchone()
            scope = row[0] if row else ""
            if not scope:  # made once, like an Azure DPS instance's (e.g. 0ne00A1B2C3)
                scope = "0ne" + secrets.token_hex(4).upper()
                conn.execute("INSERT INTO dps_meta VALUES ('id_scope', ?)", (scope,))
            groups = [r[0] for r in conn.execute("SELECT doc FROM dps_groups")]
            regs = [r[0] for r in conn.execute("SELECT doc FROM dps_registrations")]
            return groups, regs, scope

        groups, regs, self.id_scope = await self._db.run(load)
        self.groups = {g.group_id: g for g in map(_group_from_doc, groups)}
        self.registrations = {r.registration_id: r for r in
                              (Registration(**json.loads(doc)) for doc in regs)}

    async def put_group(self, group_id: str, body: Mapping[str, Any], *,
                        if_match: str | None = None) -> tuple[EnrollmentGroup, bool]:
        """Create or replace a group; returns it and whether it was created."""
        now = self._clock()
        group = parse_group(group_id, body, now=now)
        old = self.groups.get(group_id)
        if if_match not in (None, "*") and (old is None or old.etag != if_match.strip('"')):
            raise PreconditionFailedError(f"etag mismatch for enrollment group {group_id!r}")
        if old is None and len(self.groups) >= MAX_GROUPS:
            raise ConflictError(f"at most {MAX_GROUPS} enrollment groups")
        if old is not None:
            keys = body.get("attestation", {}).get("symmetricKey") or {}
            group = replace(group, created=old.created,
                            primary_key=group.primary_key if keys.get("primaryKey")
                            else old.primary_key,
                            secondary_key=group.secondary_key if keys.get("secondaryKey")
                            else old.secondary_key)
        doc = _group_doc(group)
        await self._db.run(lambda c: c.execute(
            "INSERT OR REPLACE INTO dps_groups VALUES (?, ?)", (group_id, doc)))
        self.groups[group_id] = group
        return group, old is None

    def get_group(self, group_id: str) -> EnrollmentGroup:
        group = self.groups.get(group_id)
        if group is None:
            raise NotFoundError(f"enrollment group {group_id!r} not found")
        return group

    async def delete_group(self, group_id: str, *, if_match: str | None = None) -> None:
        group = self.get_group(group_id)
        if if_match not in (None, "*") and group.etag != if_match.strip('"'):
            raise PreconditionFailedError(f"etag mismatch for enrollment group {group_id!r}")
        await self._db.run(lambda c: c.execute("DELETE FROM dps_groups WHERE id = ?",
                                               (group_id,)))
        del self.groups[group_id]

    async def record(self, registration: Registration) -> None:
        doc = json.dumps({f: getattr(registration, f) for f in Registration.__slots__})
        await self._db.run(lambda c: c.execute(
            "INSERT OR REPLACE INTO dps_registrations VALUES (?, ?)",
            (registration.registration_id, doc)))
        self.registrations[registration.registration_id] = registration

    async def forget(self, registration_id: str) -> None:
        if self.registrations.pop(registration_id, None) is not None:
            await self._db.run(lambda c: c.execute(
                "DELETE FROM dps_registrations WHERE id = ?", (registration_id,)))
