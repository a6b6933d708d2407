"""CA certificates on the service API (IoT Hub ref §8): IoT Hub's certificate resource shapes.

* ``GET /certificates`` -> ``{"value": [description, ...]}``
* ``GET /certificates/{name}`` -> description
* ``PUT /certificates/{name}`` ``{"properties": {"certificate": PEM, "isVerified": bool}}``
  (``If-Match`` to replace) -> description
* ``DELETE /certificates/{name}`` -> 204
* ``POST /certificates/{name}/generateVerificationCode`` -> description with
  ``properties.verificationCode``
* ``POST /certificates/{name}/verify`` ``{"certificate": PEM}`` (CN = the code, signed by the
  CA's key) -> description, ``isVerified: true``

A description is ``{"properties": {"subject", "expiry", "thumbprint", "isVerified", "created",
"updated", "certificate"}, "id", "name", "etag", "type"}`` (:class:`~gateway.hub.cacerts.CaCertificate`).
Reads need RegistryRead, changes RegistryWrite: a trusted CA lets its holder authenticate
``certificateAuthority`` devices, which RegistryWrite can create anyway.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.api.bodies import if_match, json_body, json_response
from gateway.hub.cacerts import CaCertificate, certificate_not_found
from gateway.hub.registry import Registry

__all__ = ["CertificateRoutes"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_json, _body, _if_match = json_response, json_body, if_match



class CertificateRoutes:
    """Handlers for ``/certificates``; :meth:`routes` lists (method, path, right, handler)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def routes(self) -> list[tuple[str, str, str, Handler]]:
        read, write = "RegistryRead", "RegistryWrite"
        one = "/certificates/{name}"
        return [
            ("GET", "/certificates", read, self.list_certificates),
            ("GET", one, read, self.get_certificate),
            ("PUT", one, write, self.put_certificate),
            ("DELETE", one, write, self.delete_certificate),
            ("POST", one + "/generateVerificationCode", write, self.verification_code),
            ("POST", one + "/verify", write, self.verify),
        ]

    def _get(self, name: str) -> CaCertificate:
        cert = self.registry.certificate(name)
        if cert is None:
            raise certificate_not_found(name)
        return cert

    async def list_certificates(self, request: web.Request) -> web.Response:
        """List the CA certificates."""
        return _json({"value": [c.to_json() for c in self.registry.certificates()]})

    async def get_certificate(self, request: web.Request) -> web.Response:
        """Get one CA certificate."""
        return _json(self._get(request.match_info["name"]).to_json())

    async def put_certificate(self, request: web.Request) -> web.Response:
        """Upload a CA certificate (If-Match to replace it)."""
        cert, _ = await self.registry.put_certificate(
            request.match_info["name"], await _body(request), if_match=_if_match(request))
        return _json(cert.to_json())

    async def delete_certificate(self, request: web.Request) -> web.Response:
        """Delete a CA certificate: devices chained to it are refused from now on."""
        await self.registry.delete_certificate(request.match_info["name"],
                                               if_match=_if_match(request))
        return web.Response(status=204)

    async def verification_code(self, request: web.Request) -> web.Response:
        """Make a proof-of-possession code (sign a certificate with CN = the code)."""
        cert = await self.registry.generate_verification_code(
            request.match_info["name"], if_match=_if_match(request))
        return _json(cert.to_json(with_code=True))

    async def verify(self, request: web.Request) -> web.Response:
        """Verify a CA with a certificate whose CN is the code, signed by the CA's key."""
        body = await _body(request)
        cert = await self.registry.verify_certificate(
            request.match_info["name"], body.get("certificate"), if_match=_if_match(request))
        return _json(cert.to_json())
