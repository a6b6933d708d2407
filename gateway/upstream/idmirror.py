"""Identities from the parent (federation, federation.md §2; IoT Hub ref §9.1, §14.1).

The parent sends down every identity in our scope (devices in its registry whose parent chain
runs through us, and their modules) with their keys and thumbprints, so a device can
authenticate here while our link is down. Changes come as they happen (``put``/``delete``
over the downlink: a disabled or deleted identity is refused here at once, its live
connection closed by the broker as for a local change); on every (re)connection and every
``federation_refresh`` seconds a full refresh follows, ending with ``sync``: the list of all of
them, so what the parent deleted while we were offline goes too.

Translation: the parent names an identity's parent gateway by device id; here it becomes that
device's local scope (our own upstream identity: no parent, the device is ours). Which
identities came from the parent is kept in ``hub.db`` (``federation_identities``): only those
are deleted by a ``sync``, and local ones are never overwritten by ids the parent lacks.
Rule for a gateway that already exists here as an edge device (a child gateway's link
credential at this hub): its own authentication is always kept (the key a child gateway dials
us with is ours to rotate), status and scope follow the parent.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping
from typing import Any, Final

from gateway.errors import GatewayError, NotFoundError
from gateway.hub.registry import Registry
from gateway.store.db import Database, Migration

log = logging.getLogger(__name__)

MIGRATION: Final[Migration] = (
    "federation_identities",
    (
        """
        CREATE TABLE federation_identities(
            device_id TEXT NOT NULL,
            module_id TEXT NOT NULL,
            PRIMARY KEY(device_id, module_id)) WITHOUT ROWID;
        """,
    ),
)

Key = tuple[str, str | None]
_AUTH_FIELDS = ("type", "symmetricKey", "x509Thumbprint")


class IdentityMirror:
    def __init__(self, registry: Registry, db: Database, *, local_gateway: str) -> None:
        self.registry = registry
        self.db = db
        self.local_gateway = local_gateway
        self.owned: set[Key] = set()
        self.applying: set[str] = set()  # device ids being changed from above right now
        self.applied = 0

    async def open(self) -> None:
        await self.db.migrate(MIGRATION)

        def load(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            return list(conn.execute("SELECT device_id, module_id FROM federation_identities"))

        self.owned = {(d, m or None) for d, m in await self.db.run(load)}

    async def _own(self, key: Key, owned: bool) -> None:
        if owned == (key in self.owned):
            return
        if owned:
            self.owned.add(key)
            sql = "INSERT OR IGNORE INTO federation_identities VALUES (?, ?)"
        else:
            self.owned.discard(key)
            sql = "DELETE FROM federation_identities WHERE device_id = ? AND module_id = ?"
        await self.db.submit(lambda conn: conn.execute(sql, (key[0], key[1] or "")))

    def _local(self, device_id: str, upstream_id: str) -> str:
        return self.local_gateway if device_id == upstream_id else device_id

    async def handle(self, op: str, payload: bytes, upstream_id: str) -> None:
        """One identity message; errors are logged (one bad identity stops nothing else)."""
        try:
            message = json.loads(payload)
            self.applying = _target(message, upstream_id, self.local_gateway)
            if op == "put" and "device" in message:
                await self._put_device(message["device"], message.get("parent"), upstream_id)
            elif op == "put" and "module" in message:
                await self._put_module(message["module"], upstream_id)
            elif op == "delete":
                await self._delete(self._local(message["deviceId"], upstream_id),
                                   message.get("moduleId"))
            elif op == "sync":
                await self._sync({(self._local(d, upstream_id), m) for d, m in message["ids"]})
            else:
                raise ValueError(f"unknown identity op {op!r}")
            self.applied += 1
        except (GatewayError, ValueError, KeyError, TypeError) as exc:
            log.warning("identity from the parent not applied (%s): %s", op, exc)
        finally:
            self.applying = set()

    async def _put_device(self, body: Mapping[str, Any], parent: str | None,
                          upstream_id: str) -> None:
        device_id = body["deviceId"]
        if device_id == upstream_id:
            return  # ourselves: our own identity lives at the parent
        existing = self.registry.get_device(device_id)
        new: dict[str, Any] = {
            "deviceId": device_id, "status": body.get("status", "enabled"),
            "statusReason": body.get("statusReason"),
            "authentication": {k: v for k, v in body["authentication"].items()
                               if k in _AUTH_FIELDS},
            "capabilities": body.get("capabilities") or {"iotEdge": False},
        }
        if existing is not None and existing.iot_edge:  # a child gateway's link credential
            new["authentication"] = existing.to_json()["authentication"]
        if parent is not None and parent != upstream_id:
            owner = self.registry.get_device(parent)
            if owner is not None and owner.device_scope:
                new["parentScopes"] = [owner.device_scope]
                new["deviceScope"] = owner.device_scope
        if existing is not None and _same(existing.to_json(), new):
            await self._own((device_id, None), True)
            return
        await self.registry.put_device(new, device_id=device_id,
                                       if_match=None if existing is None else "*")
        await self._own((device_id, None), True)
        log.info("identity %s %s from the parent", device_id,
                 "created" if existing is None else "updated")

    async def _put_module(self, body: Mapping[str, Any], upstream_id: str) -> None:
        device_id = self._local(body["deviceId"], upstream_id)
        module_id = body["moduleId"]
        if self.registry.get_device(device_id) is None:
            raise NotFoundError(f"module {module_id} of unknown device {device_id}")
        existing = self.registry.get_module(device_id, module_id)
        new = {"deviceId": device_id, "moduleId": module_id,
               "authentication": {k: v for k, v in body["authentication"].items()
                                  if k in _AUTH_FIELDS}}
        if existing is not None and existing.to_json()["authentication"] == new["authentication"]:
            await self._own((device_id, module_id), True)
            return
        await self.registry.put_module(new, device_id=device_id, module_id=module_id,
                                       if_match=None if existing is None else "*")
        await self._own((device_id, module_id), True)

    async def _delete(self, device_id: str, module_id: str | None) -> None:
        key = (device_id, module_id)
        if key not in self.owned:
            return  # not the parent's to delete
        try:
            if module_id is None:
                await self.registry.delete_device(device_id, if_match=None)
                for owned in [k for k in self.owned if k[0] == device_id]:
                    await self._own(owned, False)
            else:
                await self.registry.delete_module(device_id, module_id, if_match=None)
        except NotFoundError:
            pass
        await self._own(key, False)
        log.info("identity %s%s deleted by the parent", device_id,
                 f"/{module_id}" if module_id else "")

    async def _sync(self, ids: set[Key]) -> None:
        for key in sorted(self.owned - ids, key=lambda k: (k[0], k[1] is None)):
            if key in self.owned:  # (a device's deletion takes its modules along)
                await self._delete(*key)


def _same(current: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return (current["status"] == new["status"]
            and current["authentication"] == new["authentication"]
            and bool(current["capabilities"].get("iotEdge"))
            == bool(new["capabilities"].get("iotEdge"))
            and list(current.get("parentScopes") or []) == list(new.get("parentScopes") or []))


def _target(message: Any, upstream_id: str, local_gateway: str) -> set[str]:
    """The device id an identity message changes (its changes here are the parent's)."""
    if not isinstance(message, dict):
        return set()
    body = message.get("device") or message.get("module") or message
    device_id = body.get("deviceId") if isinstance(body, dict) else None
    if not isinstance(device_id, str):
        return set()
    return {local_gateway if device_id == upstream_id else device_id}
