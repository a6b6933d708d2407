"""The one error tree of the gateway.

Every error the gateway raises on purpose derives from :class:`GatewayError`.
Errors carry data (a reason, a code) rather than only a message, so the shell
that catches them can map them to a CONNACK code, an HTTP status or an exit code
in one place.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose. ``code`` is the IoT Hub error code a
    subclass reports over HTTP (``iothub-errorcode``), when it has a more precise one."""

    code: str | None = None


class ConfigError(GatewayError):
    """The configuration is invalid. ``path`` names the offending key (``mqtt.port``)."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class ProtocolError(GatewayError):
    """A protocol rule was broken. Not raised directly: use a subclass."""

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise Local- or RemoteProtocolError")
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: malformed bytes, a forbidden packet, an oversize packet."""


class AuthError(GatewayError):
    """Authentication failed. ``connack`` is the MQTT 3.1.1 CONNACK return code to send
    (4 bad username or password, 5 not authorized)."""

    def __init__(self, reason: str, *, connack: int = 5) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connack = connack


class ForbiddenError(GatewayError):
    """An authenticated principal tried something it has no right to."""


class NotFoundError(GatewayError):
    """A named thing (device, module, policy, consumer group) does not exist."""


class ConflictError(GatewayError):
    """The thing already exists (HTTP 409)."""


class PreconditionFailedError(GatewayError):
    """An etag given with If-Match does not match (HTTP 412)."""


class InvalidRequestError(GatewayError):
    """A request is malformed or breaks a limit (HTTP 400)."""


class MessageTooLargeError(InvalidRequestError):
    """A message is over its size limit (256 KB for telemetry). ``size`` and ``limit`` are in
    bytes, when the raiser gives them (0 otherwise)."""

    def __init__(self, message: str, *, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class GatewayTimeoutError(GatewayError):
    """A device did not answer in time (HTTP 504)."""


class RouteError(ConfigError):
    """A route does not parse. ``position`` is the 0-based offset of the problem."""

    def __init__(self, message: str, *, route: str, position: int, path: str = "") -> None:
        pointer = f"{route}\n{' ' * position}^"
        super().__init__(f"{message} at column {position + 1}\n{pointer}", path=path)
        self.route = route
        self.position = position


class StoreError(GatewayError):
    """The durable store failed (disk full, I/O error, corrupt file)."""


class StoreFullError(StoreError):
    """The store is at its byte cap and its policy is to refuse new messages."""


class QuotaExceededError(StoreError):
    """The hub's daily message quota is used up (IoT Hub 403002): nothing is stored until
    00:00 UTC."""


class UpstreamError(GatewayError):
    """The link to the parent hub failed."""


class UpstreamRefusedError(UpstreamError):
    """The parent refused the upstream connection with CONNACK return code ``connack``."""

    def __init__(self, reason: str, *, connack: int) -> None:
        super().__init__(reason)
        self.connack = connack


class EndpointError(GatewayError):
    """A custom endpoint's far side failed or refused; the endpoint retries later."""


class DeviceError(GatewayError):
    """A southbound device failed. ``device_id`` names it."""

    def __init__(self, message: str, *, device_id: str = "") -> None:
        super().__init__(f"{device_id}: {message}" if device_id else message)
        self.device_id = device_id
