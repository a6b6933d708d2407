"""Configuration from the parent, part two: the gateway's modules (bridges) and their settings.

The parent's operator writes ``modules`` into the desired properties of this gateway's identity
up there, next to ``routing`` (:mod:`gateway.upstream.configpush`), one entry per module in the
shape of the module's own configuration here, its twin's desired document (README "Connect
sensors")::

    {"modules": {"modbus": {"buses": {...}, "devices": {...}}, "serial": {...}}}

Each listed module must be one of this gateway's (a module identity under ``hub.device_id``,
declared in ``gateway.toml``); its desired document is made equal to the parent's (a merge
patch of the difference, so keys the parent dropped go and an unchanged document writes
nothing), and the bridge applies it live as it applies any twin change, reporting its verdict
in the module's reported ``config``. Reported up as ``modules``::

    {"desiredVersion": N, "applied": ["modbus"], "refused": [{"name": "ble", "reason": ...}]}

Which wins: **the parent, for the modules it lists**, as for routes, endpoints and
enrichments (:mod:`gateway.upstream.configpush`). A listed module's desired properties are the
parent's: a local write to them (the service API, so ``gateway twin update GW --module M``
and the web page) is refused naming the owner, and ``gateway twin show GW --module M`` shows
it as ``properties.desired.$metadata.$owner``; the module's tags and its reported properties
stay local. A module whose push is refused stays the parent's if it was before (kept as it
was). A module the parent stops listing keeps its last document and is local again. The
names are kept in ``hub.db`` with the routing names, so a restart keeps the rule.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from gateway.errors import GatewayError
from gateway.hub.twinsvc import TwinService

log = logging.getLogger(__name__)

MODULES_KEY = "modules"


def merge_patch(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7396) that turns ``current`` into ``wanted``; ``{}`` if equal."""
    patch: dict[str, Any] = {}
    for key in current:
        if key not in wanted:
            patch[key] = None
    for key, value in wanted.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            sub = merge_patch(old, value)
            if sub:
                patch[key] = sub
        elif key not in current or old != value:
            patch[key] = value
    return patch


def apply_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``target`` with the JSON merge patch ``patch`` applied (as a twin merges desired)."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = apply_patch(out[key], value)
        else:
            out[key] = value
    return out


def _document(desired: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in desired.items() if not k.startswith("$")}


class ModulePush:
    def __init__(self, twins: TwinService, *, gateway_id: str) -> None:
        self.twins = twins
        self.gateway_id = gateway_id
        self.owned: set[str] = set()  # modules whose document the parent set (ConfigPush keeps it)
        self.owner = "the parent hub"  # who (ConfigPush names the parent)

    def owner_of(self, device_id: str, module_id: str | None) -> str | None:
        """Who owns the desired properties of ``device_id/module_id`` by configuration push:
        the parent's name for a module of ours it lists, else None."""
        if module_id is not None and device_id == self.gateway_id and module_id in self.owned:
            return self.owner
        return None

    async def apply(self, wanted: Any, *, version: Any = None) -> dict[str, Any]:
        """Make each listed module's desired document the parent's; returns the report."""
        applied: list[str] = []
        refused: list[dict[str, str]] = []
        if not isinstance(wanted, Mapping):
            refused.append({"name": "*", "reason": "modules must be an object: name -> "
                            "the module's desired properties"})
            wanted = {}
        registry = self.twins.hub.registry
        for name, document in wanted.items():
            if registry.get_module(self.gateway_id, name) is None:
                refused.append({"name": name, "reason": f"no module {name!r} on gateway "
                                f"{self.gateway_id} (declare it in gateway.toml [modules.{name}])"})
                continue
            if not isinstance(document, Mapping):
                refused.append({"name": name, "reason": "its desired properties must be an "
                                "object"})
                continue
            try:
                twin = await self.twins.twin(self.gateway_id, name)
                current = _document(twin.document()["properties"]["desired"])
                patch = merge_patch(current, _document(document))
                if patch:
                    await self.twins.service_update(
                        self.gateway_id, name, {"properties": {"desired": patch}},
                        if_match=None, replace=False, as_owner=True)
            except (GatewayError, ValueError, TypeError) as exc:
                refused.append({"name": name, "reason": str(exc)})
                continue
            applied.append(name)
        refused_names = {r["name"] for r in refused}
        self.owned = set(applied) | {name for name in self.owned  # refused: kept as it was
                                     if name in refused_names and name in wanted}
        log.info("modules from the parent applied: %s; refused: %s", applied or "none",
                 [f"{r['name']}: {r['reason']}" for r in refused] or "none")
        return {"desiredVersion": version, "applied": applied, "refused": refused}
