"""The IoT Hub MQTT CONNECT username (IoT Hub ref §1.2). Pure.

Device and module IDs travel raw, never percent-encoded, and may contain
``- . + % _ # * ? ! ( ) , : = @ $ '`` -- but never ``/``. So the parser splits on ``/`` only
and never on ``?`` inside an ID.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from gateway.errors import AuthError

__all__ = ["Username", "parse_username"]

_MAX_USERNAME_LENGTH = 4096


@dataclass(frozen=True, slots=True)
class Username:
    """A parsed username. ``host`` is the IoT Hub host name the client was configured with
    (not necessarily ours: behind a gateway it is the upstream hub's)."""

    host: str
    device_id: str
    module_id: str | None
    api_version: str
    client_type: str | None
    model_id: str | None
    auth_chain: str | None

    @property
    def client_id(self) -> str:
        """The MQTT client identifier this username implies: ``dev`` or ``dev/mod``."""
        return self.device_id if self.module_id is None else f"{self.device_id}/{self.module_id}"


def _reject(reason: str) -> AuthError:
    return AuthError(f"malformed username: {reason}", connack=4)


# Grammar (after edgeHub's MqttUsernameParser, IoT Hub ref §1.2):
#
#   username   = host "/" device-id "/" [ module-id "/" ] "?" query     ; current SDKs
#              | host "/" device-id "/" [ module-id "/" ] query         ; legacy: query must
#                                                                       ;   contain "api-version="
#   host       = *( any char except "/" )         ; not checked here (may be the upstream hub)
#   device-id  = 1*( any char except "/" )        ; raw, not percent-decoded
#   module-id  = 1*( any char except "/" )
#   query      = param *( "&" param )
#   param      = name [ "=" value ]               ; value percent-decoded; "+" stays "+"
#
# Known names: api-version (required, non-empty; value not checked), DeviceClientType,
# model-id, auth-chain. Unknown names are ignored; for a repeated name the first one wins.
#
# Disambiguation: a module segment is present when the text after the device segment is
# "{segment}/?{query}" or (legacy) "{segment}/{query with api-version=}"; otherwise the text
# after the device segment is the query itself. Thus a query value carrying a raw "/" (some
# hand-written clients do not encode DeviceClientType) still parses as a device username.
def parse_username(username: str) -> Username:
    """Parse a CONNECT username; :class:`AuthError` (CONNACK 4) when malformed or when
    ``api-version`` is missing or empty (IoT Hub ref §1.2)."""
    if len(username) > _MAX_USERNAME_LENGTH:
        raise _reject("too long")
    host, sep, rest = username.partition("/")
    if not sep:
        raise _reject("no '/' after the host name")
    device_id, sep, rest = rest.partition("/")
    if not sep or not device_id:
        raise _reject("no device id")
    module_id: str | None = None
    candidate, sep, after = rest.partition("/")
    if sep and candidate and (after.startswith("?") or
                              (not rest.startswith("?") and "api-version=" in after)):
        module_id, rest = candidate, after
    if rest.startswith("?"):
        query = rest[1:]
    elif "api-version=" in rest:
        query = rest
    else:
        raise _reject("no '?' before the query")
    params: dict[str, str] = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        params.setdefault(name, value)
    api_version = unquote(params.get("api-version", "")).strip()
    if not api_version:
        raise _reject("api-version missing or empty")

    def optional(name: str) -> str | None:
        value = params.get(name)
        return unquote(value) if value else None

    return Username(
        host=host,
        device_id=device_id,
        module_id=module_id,
        api_version=api_version,
        client_type=optional("DeviceClientType"),
        model_id=optional("model-id"),
        auth_chain=optional("auth-chain"),
    )
