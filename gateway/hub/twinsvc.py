"""Twins over MQTT and for the service API (IoT Hub ref §4, §9.2, §10.5).

Device side: ``$iothub/twin/GET/?$rid=`` answers 200 with the properties document on
``$iothub/twin/res/200/?$rid=``; ``$iothub/twin/PATCH/properties/reported/?$rid=`` merges the
patch and answers 204 with ``&$version=`` (the new reported version), or 400 for malformed JSON
or a patch over a limit. Answers go only to a connection subscribed to ``$iothub/twin/res/#``.
Service side: GET/PATCH/PUT of the full twin; a desired change is pushed at once to the
identity's connection if it holds ``$iothub/twin/PATCH/properties/desired/#`` (patches are not
queued for offline devices: a reconnecting device catches up with a GET, ref §4.1).
Every change is recorded in the message log as a ``twinChangeEvents`` message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from gateway.errors import (
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    PreconditionFailedError,
)
from gateway.hub import addresses
from gateway.hub.addresses import (
    ChildReportedPatch,
    DesiredPatchesFilter,
    TwinGet,
    TwinReportedPatch,
    TwinResponsesFilter,
)
from gateway.hub.connections import Connection, Connections
from gateway.hub.twinmirror import owner_of
from gateway.hub.twins import Twin
from gateway.hub.twinstore import TwinStore
from gateway.tasks import TaskSet

if TYPE_CHECKING:
    from gateway.hub.hub import Hub

log = logging.getLogger(__name__)


def _client_id(device_id: str, module_id: str | None) -> str:
    return f"{device_id}/{module_id}" if module_id else device_id


class TwinService:
    def __init__(self, store: TwinStore, *, hub: Hub, broker: Connections, tasks: TaskSet) -> None:
        self.store = store
        self.hub = hub
        self.broker = broker
        self.tasks = tasks
        # the owner of a module's desired properties by configuration push (modulepush)
        self.configured_owner: Callable[[str, str | None], str | None] = lambda d, m: None

    # -- identities come and go ----------------------------------------------------------------

    def identity_changed(self, event: str, identity: Any) -> None:
        module_id = getattr(identity, "module_id", None)
        if event == "created":
            self.tasks.spawn(self.store.ensure(identity.device_id, module_id), "twin-create")
        elif event == "deleted":
            self.tasks.spawn(self.store.delete(identity.device_id, module_id), "twin-delete")

    async def twin(self, device_id: str, module_id: str | None) -> Twin:
        twin = self.store.get(device_id, module_id)
        if twin is not None:
            return twin
        if not self._identity_exists(device_id, module_id):
            raise NotFoundError(f"{_client_id(device_id, module_id)} not found")
        return await self.store.ensure(device_id, module_id)

    def _identity_exists(self, device_id: str, module_id: str | None) -> bool:
        registry = self.hub.registry
        if module_id is None:
            return registry.get_device(device_id) is not None
        return registry.get_module(device_id, module_id) is not None

    # -- MQTT ------------------------------------------------------------------------------------

    def _respond(self, conn: Connection, status: int, rid: str, body: Any = None,
                 version: int | None = None) -> None:
        if self.broker.target(conn.client_id, TwinResponsesFilter) is not conn:
            log.info("twin response dropped: no $iothub/twin/res/# subscription client_id=%r",
                     conn.client_id)
            return
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        conn.publish(addresses.twin_response_topic(status, rid, version), payload, 0)

    def handle_get(self, conn: Connection, address: TwinGet) -> asyncio.Future[None]:
        assert conn.principal is not None
        p = conn.principal

        async def run() -> None:
            twin = await self.twin(p.device_id, p.module_id)
            self._respond(conn, 200, address.rid, twin.device_view())

        return self.tasks.spawn(run(), f"twin-get {conn.client_id}")

    def handle_reported(self, conn: Connection, address: TwinReportedPatch,
                        body: bytes) -> asyncio.Future[None]:
        """Merge, commit, then answer 204 (the future is done once the answer is out). A twin
        that exists takes the path without a task: merged now, answered from the commit's
        callback; one still being created waits for it on a task."""
        assert conn.principal is not None
        p = conn.principal
        federation = self.hub.federation
        if self.store.get(p.device_id, p.module_id) is not None and (
                federation is None or not federation.has_parent()):
            return self._reported_now(conn, address, body)  # (a leaf's patch may go up)

        async def run() -> None:
            status, answer, version = await self._patch_reported(
                p.device_id, p.module_id, body, address.version, conn.client_id)
            self._respond(conn, status, address.rid, answer, version)

        return self.tasks.spawn(run(), f"twin-patch {conn.client_id}")

    def _reported_now(self, conn: Connection, address: TwinReportedPatch,
                      body: bytes) -> asyncio.Future[None]:
        """:meth:`handle_reported` for an existing twin, as :meth:`_patch_reported` does it."""
        p = conn.principal
        assert p is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        notify = self.hub.wants_twin_changes()
        try:
            patch = json.loads(body)
            if not isinstance(patch, dict):
                raise InvalidRequestError("a reported patch must be a JSON object")
            committed = self.store.start_update_reported(
                p.device_id, p.module_id, patch, expected_version=address.version,
                notify=notify)
        except (ValueError, InvalidRequestError) as exc:  # json errors are ValueErrors
            log.warning("reported patch refused client_id=%r twin=%s reason=%s",
                        conn.client_id, _client_id(p.device_id, p.module_id), exc)
            self._respond(conn, 400, address.rid, {"message": str(exc)})
            done.set_result(None)
            return done
        except PreconditionFailedError as exc:
            self._respond(conn, 412, address.rid, {"message": str(exc)})
            done.set_result(None)
            return done
        except Exception as exc:  # the twin went away meanwhile: as a failed task would
            log.error("twin patch failed client_id=%r: %r", conn.client_id, exc)
            done.set_exception(exc)
            return done

        def answer(fut: asyncio.Future[tuple[Twin, dict[str, Any]]]) -> None:
            if fut.cancelled():
                done.cancel()
                return
            exc = fut.exception()
            if exc is not None:  # not durable: no answer; the connection closes (PUBACK rule)
                log.error("twin patch failed client_id=%r: %r", conn.client_id, exc)
                done.set_exception(exc)
                return
            twin, change = fut.result()
            if change:
                self.hub.twin_change_event(p.device_id, p.module_id, "updateTwin", change)
            self._respond(conn, 204, address.rid, None, twin.reported_version)
            done.set_result(None)

        committed.add_done_callback(answer)
        return done

    def handle_child_reported(self, conn: Connection, address: ChildReportedPatch,
                              body: bytes) -> asyncio.Future[None] | None:
        """A bridge module's patch on behalf of its child (gateway.translation); there is no
        answer topic, so a refusal is logged. The PUBACK follows the write (None: at once)."""
        assert conn.principal is not None
        p = conn.principal
        if self.hub.children.owner_of(address.device_id, p.device_id, p.module_id) is None:
            log.warning("child reported patch refused client_id=%r device_id=%r: not its child",
                        conn.client_id, address.device_id)
            return None

        async def run() -> None:
            await self._patch_reported(address.device_id, None, body, None, conn.client_id)

        return self.tasks.spawn(run(), f"child-twin-patch {address.device_id}")

    async def _patch_reported(self, device_id: str, module_id: str | None, body: bytes,
                              expected_version: int | None,
                              sender: str) -> tuple[int, Any, int | None]:
        """Merge a reported patch: ``(status, answer body, new reported version)``."""
        try:
            patch = json.loads(body)
            if not isinstance(patch, dict):
                raise InvalidRequestError("a reported patch must be a JSON object")
            await self.twin(device_id, module_id)
            twin, change = await self.store.update_reported(
                device_id, module_id, patch, expected_version=expected_version,
                notify=self.hub.wants_twin_changes())
        except (ValueError, InvalidRequestError) as exc:  # json errors are ValueErrors
            log.warning("reported patch refused client_id=%r twin=%s reason=%s", sender,
                        _client_id(device_id, module_id), exc)
            return 400, {"message": str(exc)}, None
        except PreconditionFailedError as exc:
            return 412, {"message": str(exc)}, None
        if change:
            self.hub.twin_change_event(device_id, module_id, "updateTwin", change)
        if self.hub.federation is not None:  # owned upstream: queued for the parent first
            queued = self.hub.federation.reported_changed(device_id, module_id, twin, patch)
            if queued is not None:
                await queued
        return 204, None, twin.reported_version

    async def federated_reported(self, device_id: str, module_id: str | None,
                                 patch: Mapping[str, Any]) -> None:
        """A reported patch a child gateway sent up for an identity behind it."""
        twin, change = await self.store.update_reported(
            device_id, module_id, patch, notify=self.hub.wants_twin_changes())
        if change:
            self.hub.twin_change_event(device_id, module_id, "updateTwin", change)

    # -- service ---------------------------------------------------------------------------------

    def desired_owner(self, device_id: str, module_id: str | None, twin: Twin) -> str | None:
        """Who the desired properties belong to when not to this hub: the owner of a mirrored
        twin, the parent of an identity from the parent, or the parent whose configuration
        push lists the module (:attr:`configured_owner`); None when they are local."""
        owner = owner_of(twin)
        federation = self.hub.federation
        if owner is None and federation is not None and federation.is_mirrored(device_id,
                                                                               module_id):
            owner = "the parent hub"  # an identity from the parent, desired not yet written
        return owner if owner is not None else self.configured_owner(device_id, module_id)

    async def service_update(self, device_id: str, module_id: str | None,
                             body: Mapping[str, Any], *, if_match: str | None,
                             replace: bool, as_owner: bool = False) -> Twin:
        """A service write (tags and desired). ``as_owner``: the configuration push writing
        on its owner's behalf, the only writer of an owned module's desired properties."""
        current = await self.twin(device_id, module_id)
        owner = self.desired_owner(device_id, module_id, current)
        if owner is not None and not as_owner and _writes_desired(body):
            pushed = self.configured_owner(device_id, module_id) is not None \
                and owner_of(current) is None
            raise ForbiddenError(  # federation: the parent's section (twinmirror, modulepush)
                f"the desired properties of {_client_id(device_id, module_id)} belong to "
                f"{owner}{' (its configuration push sets them)' if pushed else ''}; change "
                "them there (tags may be set here)")
        twin, change, push = await self.store.update_desired(
            device_id, module_id, body, if_match=if_match, replace=replace)
        self.hub.twin_change_event(device_id, module_id,
                                   "replaceTwin" if replace else "updateTwin", change)
        if push is not None and self.hub.federation is not None:  # behind child gateways
            self.hub.federation.desired_changed(device_id, module_id, twin, push)
        await self._push_desired(device_id, module_id, twin, push)
        return twin

    async def mirror(self, device_id: str, module_id: str | None, *, version: int,
                     patch: Mapping[str, Any] | None, desired: Mapping[str, Any],
                     owner: str) -> Twin | None:
        """The parent's desired state for an identity here (federation); None if already
        applied. The device gets the patch, as for a service write."""
        await self.twin(device_id, module_id)
        done = await self.store.mirror_desired(device_id, module_id, version=version,
                                               patch=patch, desired=desired, owner=owner)
        if done is None:
            return None
        twin, change, push = done
        self.hub.twin_change_event(device_id, module_id, "updateTwin", change)
        if self.hub.federation is not None:
            self.hub.federation.desired_changed(device_id, module_id, twin, push)
        await self._push_desired(device_id, module_id, twin, push)
        return twin

    async def _push_desired(self, device_id: str, module_id: str | None, twin: Twin,
                            push: dict[str, Any] | None) -> None:
        if module_id is not None and push is not None:
            await self.hub.children.module_desired(device_id, module_id, twin.desired)
        elif push is not None:
            self.hub.children.desired_changed(device_id)
        if push is not None:
            conn = self.broker.target(_client_id(device_id, module_id), DesiredPatchesFilter)
            if conn is not None:
                conn.publish(addresses.desired_patch_topic(twin.desired_version),
                             json.dumps(push, separators=(",", ":")).encode(), 0)


def _writes_desired(body: Mapping[str, Any]) -> bool:
    properties = body.get("properties")
    return isinstance(properties, Mapping) and properties.get("desired") is not None

