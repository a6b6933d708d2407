"""A message as conditions see it: properties by query name, the body decoded once, the twin
from memory (IoT Hub ref §10.2). Pure: the twin comes from a look-up function the caller
passes (the hub's in-memory twin store), never from storage.

One :class:`MessageView` is made per message; every route's condition reads the same view,
so the body is decoded at most once however many routes look at it, and only if one does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.routing.query import UNDEFINED, Value

try:  # a faster JSON decoder when present; the stdlib one otherwise (same results)
    import orjson

    _loads_utf8: Callable[[bytes], Any] = orjson.loads
    _DecodeError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is a dependency
    _loads_utf8 = json.loads
    _DecodeError = ValueError


class TwinLike(Protocol):
    @property
    def tags(self) -> Mapping[str, Any]: ...
    @property
    def desired(self) -> Mapping[str, Any]: ...
    @property
    def reported(self) -> Mapping[str, Any]: ...


TwinLookup = Callable[[str, "str | None"], "TwinLike | None"]

SYSTEM_NAMES: dict[str, str] = {
    "contenttype": "content-type",
    "contentencoding": "content-encoding",
    "connectiondeviceid": "iothub-connection-device-id",
    "connectionmoduleid": "iothub-connection-module-id",
    "connectiondevicegenerationid": "iothub-connection-auth-generation-id",
    "connectionauthmethod": "iothub-connection-auth-method",
    "messageid": "message-id",
    "correlationid": "correlation-id",
    "userid": "user-id",
    "outputname": "output-name",
    "messagesource": "iothub-message-source",
    "interfaceid": "iothub-interface-id",
    "expirytimeutc": "absolute-expiry-time",
    "iothub-creation-time-utc": "creation-time",
    "creation-time-utc": "creation-time",
    "creationtimeutc": "creation-time",
    "dt-dataschema": "dt-dataschema",
    "dt-subject": "dt-subject",
}
"""Query name (``$contentType``, case-insensitive) -> the stored system property name. Other
``$names`` are looked up as stored names (``$iothub-connection-device-id`` works too)."""

loads_utf8: Callable[[bytes], Any] = _loads_utf8
"""The fast decoder for UTF-8 JSON without a byte order mark (raises ValueError where
:func:`decode_with` has more to try)."""

ENQUEUED_TIME = "enqueuedtime"
_JSON_ENCODINGS = {"utf-8": "utf-8-sig", "utf8": "utf-8-sig", "utf-16": "utf-16",
                   "utf-32": "utf-32"}


def system_key(name: str) -> str:
    """The stored system property a ``$name`` reads."""
    return SYSTEM_NAMES.get(name.lower(), name)


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def body_codec(system: Mapping[str, str]) -> str | None:
    """The codec a body with these properties is decoded with for ``$body`` queries: only for
    content type ``application/json`` with encoding utf-8, utf-16 or utf-32 (ref §10.2);
    None when the body is not to be read."""
    ctype = system.get("content-type")
    encoding = system.get("content-encoding")
    if ctype is None or encoding is None:
        return None
    if ctype.partition(";")[0].strip().lower() != "application/json":
        return None
    return _JSON_ENCODINGS.get(encoding.strip().lower())


def decode_with(body: bytes, codec: str) -> Value:
    """The body as JSON (undefined when it does not parse)."""
    if codec == "utf-8-sig" and not body.startswith(b"\xef\xbb\xbf"):
        try:
            return _loads_utf8(body)
        except _DecodeError:
            pass  # e.g. integers beyond 64 bits: the stdlib decoder below takes those
        except ValueError:
            return UNDEFINED
    try:
        return json.loads(body.decode(codec), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return UNDEFINED


def decode_body(body: bytes, system: Mapping[str, str]) -> Value:
    """The body as JSON when its properties say it is (see :func:`body_codec`), else undefined."""
    codec = body_codec(system)
    return UNDEFINED if codec is None else decode_with(body, codec)


def iso_ms(enqueued_ms: int) -> str:
    """``$enqueuedTime``: ISO 8601 UTC with milliseconds (strings compare in time order)."""
    seconds, millis = divmod(enqueued_ms, 1000)
    return f"{datetime.fromtimestamp(seconds, tz=UTC):%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"


_UNSET: Any = object()


class MessageView:
    """The operands of one message. ``system`` uses the stored names
    (:mod:`gateway.hub.messages`); application values are None for keys sent without a
    value (they read as null)."""

    __slots__ = ("_json", "_twin", "application", "body", "device_id", "enqueued_ms",
                 "module_id", "system", "twins")

    def __init__(self, system: Mapping[str, str], application: Mapping[str, str | None],
                 body: bytes, *, device_id: str, module_id: str | None, enqueued_ms: int,
                 twins: TwinLookup | None = None) -> None:
        self.system = system
        self.application = application
        self.body = body
        self.device_id = device_id
        self.module_id = module_id
        self.enqueued_ms = enqueued_ms
        self.twins = twins
        self._json: Value = _UNSET
        self._twin: Any = _UNSET

    def sys(self, name: str) -> Value:
        if name.lower() == ENQUEUED_TIME:
            return iso_ms(self.enqueued_ms)
        value = self.system.get(system_key(name), UNDEFINED)
        if value is UNDEFINED:
            return self.application.get("$" + name, UNDEFINED)
        return value

    def app(self, name: str) -> Value:
        return self.application.get(name, UNDEFINED)

    def body_json(self) -> Value:
        value = self._json
        if value is _UNSET:
            value = self._json = decode_body(self.body, self.system)
        return value

    def twin(self) -> TwinLike | None:
        twin = self._twin
        if twin is _UNSET:
            twin = self._twin = (self.twins(self.device_id, self.module_id)
                                 if self.twins is not None else None)
        return twin  # type: ignore[no-any-return]

    def twin_section(self, section: str) -> Value:
        twin = self.twin()
        if twin is None:
            return UNDEFINED
        return getattr(twin, section)  # tags, desired or reported
