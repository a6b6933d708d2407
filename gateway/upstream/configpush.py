"""Configuration from the parent: routing set in our gateway identity's twin up there.

The parent's operator writes the desired property ``routing`` of this gateway's identity, in
the service API's shape (``GET /routing``; IoT Hub ref §10)::

    {"routing": {"endpoints": [{"name": ..., "type": ..., ...}],
                 "routes": [{"name": ..., "source": ..., "condition": ..., "endpointNames": [...]}],
                 "enrichments": [{"key": ..., "value": ..., "endpointNames": [...]}]}}

Over the link (an ordinary device twin session of our own identity: ``$iothub/twin/GET`` on
every connection, then ``$iothub/twin/PATCH/properties/desired/#``) we apply it live through
the routing service, item by item (endpoints, then routes and enrichments that use them), and
report what happened as the reported property ``routing``::

    {"$version"-like "desiredVersion": N, "applied": {"routes": [...], ...},
     "refused": [{"kind": "route", "name": ..., "reason": ...}]}

Which wins: **the parent, for the names it lists** (and for the modules it lists:
:mod:`gateway.upstream.modulepush`, the same rule). A technician may add local routes,
endpoints and enrichments under other names; they are never touched. An item the parent set
here is the parent's (:meth:`ConfigPush.owner_of`): a local change to it (the service API,
so ``gateway route|endpoint|enrichment``) is refused naming the owner, and ``GET /routing``
marks it ``"owner": "parent"``. A local item under a name the parent then lists is replaced
by the parent's and becomes the parent's. Items the parent listed before and dropped are
removed here (the names it set are kept in ``hub.db``), and are local names again.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Final

from gateway.errors import GatewayError
from gateway.routingsvc import RoutingService
from gateway.store.db import Database, Migration
from gateway.upstream.link import Session
from gateway.upstream.modulepush import MODULES_KEY, ModulePush, apply_patch

log = logging.getLogger(__name__)

MIGRATION: Final[Migration] = (
    "federation_config",
    ("CREATE TABLE federation_config(key TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;",),
)
KEY: Final = "routing"
TWIN_FILTERS: Final = ("$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#")
_RES: Final = "$iothub/twin/res/"
_DESIRED: Final = "$iothub/twin/PATCH/properties/desired/"
_KINDS: Final = (("endpoints", "endpoint", "name"), ("routes", "route", "name"),
                 ("enrichments", "enrichment", "key"))


class ConfigPush:
    def __init__(self, routing: RoutingService, db: Database,
                 modules: ModulePush | None = None) -> None:
        self.routing = routing
        self.modules = modules  # ``modules`` in the same document (gateway.upstream.modulepush)
        self.db = db
        self.desired: dict[str, Any] = {}
        self.owned: dict[str, list[str]] = {}  # kind -> names the parent set here
        self.last: dict[str, Any] | None = None  # the last report
        self.owner = "the parent hub"  # who set them (the downlink names the parent)
        self._rid = 0

    async def open(self) -> None:
        await self.db.migrate(MIGRATION)

        def load(conn: sqlite3.Connection) -> dict[str, str]:
            return {str(k): str(v) for k, v in conn.execute(
                "SELECT key, doc FROM federation_config"
                " WHERE key IN ('owned', 'owner', 'modules')")}

        rows = await self.db.run(load)
        self.owned = json.loads(rows["owned"]) if "owned" in rows else {}
        self.owner = json.loads(rows["owner"]) if "owner" in rows else self.owner
        if self.modules is not None:
            self.modules.owned = set(json.loads(rows.get("modules", "[]")))
            self.modules.owner = self.owner

    async def _save(self) -> None:
        docs = [("owned", json.dumps(self.owned)), ("owner", json.dumps(self.owner))]
        if self.modules is not None:
            docs.append(("modules", json.dumps(sorted(self.modules.owned))))
        await self.db.run(lambda conn: conn.executemany(
            "INSERT OR REPLACE INTO federation_config VALUES (?, ?)", docs))

    def owner_of(self, kind: str, name: str) -> str | None:
        """Who owns routing item ``name`` of ``kind`` (route, endpoint, enrichment): the
        parent's name if its configuration push set it here, else None (local)."""
        plural = {k: p for p, k, _ in _KINDS}.get(kind)
        return self.owner if plural and name in self.owned.get(plural, ()) else None

    def modules_owner(self, device_id: str, module_id: str | None) -> str | None:
        """Who owns a module's desired properties by this push (None: local)."""
        return self.modules.owner_of(device_id, module_id) if self.modules is not None else None

    def attach(self, session: Session) -> None:
        session.link.subscribe(*TWIN_FILTERS).add_done_callback(_ignore)
        self._rid += 1
        session.send(f"$iothub/twin/GET/?$rid=cfg{self._rid}", b"").add_done_callback(_ignore)

    def wants(self, topic: str) -> bool:
        return (topic.startswith(_RES) and "rid=cfg" in topic) or topic.startswith(_DESIRED)

    async def received(self, session: Session, topic: str, payload: bytes) -> None:
        try:
            doc = json.loads(payload) if payload.strip() else {}
        except ValueError:
            return
        if topic.startswith(_RES):
            if not topic.startswith(_RES + "200/"):
                return
            desired = doc.get("desired") if isinstance(doc, dict) else None
            if isinstance(desired, dict):
                self.desired = dict(desired)
                await self._apply(session, force=True)
            return
        if isinstance(doc, dict):  # a desired patch: merged as the twin merges it
            self.desired = apply_patch(self.desired, doc)
            if KEY in doc or MODULES_KEY in doc:
                await self._apply(session, force=True,
                                  keys=[k for k in (KEY, MODULES_KEY) if k in doc])

    async def _apply(self, session: Session, *, force: bool,
                     keys: Sequence[str] = (KEY, MODULES_KEY)) -> None:
        if not force:
            return
        reports: dict[str, Any] = {}
        wanted = self.desired.get(KEY)
        if KEY in keys and (wanted is not None or any(self.owned.values())):
            reports[KEY] = await self.apply(wanted if isinstance(wanted, Mapping) else {},
                                            version=self.desired.get("$version"))
        modules = self.desired.get(MODULES_KEY)
        if self.modules is not None and MODULES_KEY in keys and (
                modules is not None or self.modules.owned):
            self.modules.owner = self.owner
            reports[MODULES_KEY] = await self.modules.apply(
                modules if modules is not None else {}, version=self.desired.get("$version"))
            await self._save()
        if not reports:
            return
        self._rid += 1
        body = json.dumps(reports, separators=(",", ":")).encode()
        session.send(f"$iothub/twin/PATCH/properties/reported/?$rid=cfg{self._rid}",
                     body).add_done_callback(_ignore)

    async def apply(self, wanted: Mapping[str, Any], *, version: Any = None) -> dict[str, Any]:
        """Make the parent's items so; returns the report (applied and refused items)."""
        applied: dict[str, list[str]] = {plural: [] for plural, _, _ in _KINDS}
        refused: list[dict[str, str]] = []
        owned: dict[str, list[str]] = {plural: [] for plural, _, _ in _KINDS}
        for plural, kind, id_key in _KINDS:
            items = wanted.get(plural) or []
            if not isinstance(items, list):
                refused.append({"kind": kind, "name": "*", "reason": f"{plural} must be a list"})
                continue
            for item in items:
                name = item.get(id_key) if isinstance(item, Mapping) else None
                if not isinstance(name, str) or not name:
                    refused.append({"kind": kind, "name": "?", "reason": f"no {id_key}"})
                    continue
                body = {k: v for k, v in item.items() if k != id_key}
                try:
                    if kind == "endpoint":
                        await self.routing.put_endpoint(name, body)
                    elif kind == "route":
                        await self.routing.put_route(name, body)
                    else:
                        await self.routing.put_enrichment(name, body)
                except (GatewayError, ValueError, TypeError) as exc:
                    refused.append({"kind": kind, "name": name, "reason": str(exc)})
                    continue
                applied[plural].append(name)
                owned[plural].append(name)
        # what the parent set before and no longer lists goes (routes before their endpoints)
        for plural, kind, _ in reversed(_KINDS):
            for name in self.owned.get(plural, []):
                if name in owned[plural]:
                    continue
                if any(r["kind"] == kind and r["name"] == name for r in refused):
                    owned[plural].append(name)  # still the parent's: kept as it was
                    continue
                try:
                    if kind == "endpoint":
                        await self.routing.delete_endpoint(name)
                    elif kind == "route":
                        await self.routing.delete_route(name)
                    else:
                        await self.routing.delete_enrichment(name)
                except GatewayError as exc:
                    refused.append({"kind": kind, "name": name,
                                    "reason": f"could not remove: {exc}"})
                    owned[plural].append(name)
        self.owned = owned
        await self._save()
        self.last = {"desiredVersion": version, "applied": applied, "refused": refused}
        log.info("configuration from the parent applied: %s; refused: %s", applied,
                 [f"{r['kind']} {r['name']}: {r['reason']}" for r in refused] or "none")
        return self.last


def _ignore(future: Any) -> None:
    if not future.cancelled():
        future.exception()
