"""The provisioning service's REST routes: enrollment groups and registration states.

Shapes as the Device Provisioning Service's service API (``PUT|GET|DELETE
/enrollmentGroups/{id}``, ``POST /enrollmentGroups/query``, ``GET|DELETE
/registrations/{id}``), on the hub's HTTPS port, authorized by the hub's own policies:
reading needs ``RegistryRead``, changing needs ``RegistryWrite``. ``GET /provisioning`` gives
the ID scope and the hub devices are assigned to. Group keys are returned on create and on
``GET`` (the DPS API does the same); lists leave them out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.errors import ConflictError, NotFoundError
from gateway.hub.enrollments import EnrollmentStore
from gateway.hub.provisioning import ProvisioningService

if TYPE_CHECKING:
    from gateway.api.server import ServiceApi


def add_enrollment_routes(api: ServiceApi, service: ProvisioningService) -> None:
    from gateway.api.server import READ, WRITE, _body, _if_match, _json

    store: EnrollmentStore = service.store

    async def provisioning_info(request: web.Request) -> web.Response:
        """The provisioning service's ID scope and assigned hub."""
        return _json({"idScope": store.id_scope, "assignedHub": service.assigned_hub,
                      "enrollmentGroups": len(store.groups),
                      "registrations": len(store.registrations)})

    async def put_enrollment_group(request: web.Request) -> web.Response:
        """Create or replace an enrollment group (symmetric key or X.509 through the hub CA)."""
        group_id = request.match_info["group_id"]
        if request.headers.get("If-None-Match") == "*" and group_id in store.groups:
            raise ConflictError(f"enrollment group {group_id!r} already exists")
        group, created = await store.put_group(group_id, await _body(request),
                                               if_match=_if_match(request))
        return _json(group.json(), status=201 if created else 200,
                     headers={"ETag": f'"{group.etag}"'})

    async def get_enrollment_group(request: web.Request) -> web.Response:
        """Get one enrollment group, with its keys."""
        group = store.get_group(request.match_info["group_id"])
        return _json(group.json(), headers={"ETag": f'"{group.etag}"'})

    async def delete_enrollment_group(request: web.Request) -> web.Response:
        """Delete an enrollment group (devices it provisioned stay registered)."""
        await store.delete_group(request.match_info["group_id"], if_match=_if_match(request))
        return web.Response(status=204)

    async def query_enrollment_groups(request: web.Request) -> web.Response:
        """List enrollment groups (without their keys)."""
        return _json([g.json(keys=False) for g in sorted(store.groups.values(),
                                                          key=lambda g: g.group_id)])

    async def get_registration(request: web.Request) -> web.Response:
        """Get a device's registration state."""
        registration_id = request.match_info["registration_id"].lower()
        registration = store.registrations.get(registration_id)
        if registration is None:
            raise NotFoundError(f"registration {registration_id!r} not found")
        return _json(registration.json())

    async def query_registrations(request: web.Request) -> web.Response:
        """List the registration states of an enrollment group."""
        group_id = request.match_info["group_id"]
        store.get_group(group_id)
        return _json([r.json() for r in sorted(store.registrations.values(),
                                               key=lambda r: r.registration_id)
                      if r.group_id == group_id])

    async def delete_registration(request: web.Request) -> web.Response:
        """Forget a registration state (the device may register again)."""
        registration_id = request.match_info["registration_id"].lower()
        if registration_id not in store.registrations:
            raise NotFoundError(f"registration {registration_id!r} not found")
        await store.forget(registration_id)
        return web.Response(status=204)

    r = api.add_route
    r("GET", "/provisioning", READ, provisioning_info)
    r("PUT", "/enrollmentGroups/{group_id}", WRITE, put_enrollment_group)
    r("GET", "/enrollmentGroups/{group_id}", READ, get_enrollment_group)
    r("DELETE", "/enrollmentGroups/{group_id}", WRITE, delete_enrollment_group)
    r("POST", "/enrollmentGroups/query", READ, query_enrollment_groups)
    r("POST", "/registrations/{group_id}/query", READ, query_registrations)
    r("GET", "/registrations/{registration_id}", READ, get_registration)
    r("DELETE", "/registrations/{registration_id}", WRITE, delete_registration)
