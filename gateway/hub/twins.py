"""Device and module twins: the document, merge patches, metadata, versions, limits (IoT Hub ref §4).

Pure: no I/O and no clock. Every operation takes ``now`` (epoch seconds, from the caller's
clock) and returns a new :class:`Twin`; twins and their trees are never mutated, so unchanged
subtrees are shared between successive versions of a twin, and section sizes are kept up to
date incrementally: a patch costs about the size of the patch, not of the twin.

Decisions where the reference leaves room (each one documented where it is implemented):

* **Every accepted write is a new version.** A patch bumps the twin ``version`` and the etag,
  and the ``$version`` of each section it writes, even when the values it carries equal the
  stored ones; the keys it names get a fresh ``$lastUpdated``. IoT Hub's versions count
  updates, not differences (ref §4.3: "increments on every desired change"; the device reconnect
  flow of ref §4.1 only needs them strictly increasing), and a device that re-reports the same
  value must see its write acknowledged with a new ``$version``.
* **Presence decides which sections a service write touches**: ``tags`` and
  ``properties.desired`` are written when the body has them (even as ``{}``), and a desired
  write is pushed to the device. ``properties.reported`` and the read-only identity fields of a
  full twin (``deviceId``, ``etag``, ``status``, ...) are ignored, so a twin fetched with GET
  can be sent back; ``$metadata``/``$version`` at a section's root are ignored likewise.
* **The MQTT GET body carries no ``$metadata``** (ref §4.1: the documented example omits it and
  the SDK does not read it); :meth:`Twin.device_view` adds it on request.
* **The etag is the twin version as 8 big-endian bytes in base64** (``"AAAAAAAAAAc="`` is
  version 7), the shape IoT Hub's twin etags have; it changes exactly when the version does
  (so a twin deleted and created again reuses the etags of its first life).
* **Limits where ref §4.4 is silent**: arrays count as a nesting level and their size is the
  sum of their elements; null is refused inside arrays (as edgeHub does) and anywhere in a
  replacement (PUT); keys must not be empty; the 1 KB key and 4 KB string limits count UTF-8
  bytes, control characters included.
"""

from __future__ import annotations

import functools
import math
import re
from base64 import b64encode
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, TypeAlias

from gateway.errors import InvalidRequestError, PreconditionFailedError

__all__ = [
    "MAX_DEPTH",
    "MAX_INT",
    "MAX_KEY_BYTES",
    "MAX_STRING_BYTES",
    "MIN_INT",
    "SIZE_LIMITS",
    "Section",
    "Twin",
    "check_if_match",
    "format_time",
    "make_etag",
    "new_twin",
    "patch_desired_and_tags",
    "patch_reported",
    "replace_twin",
    "section_size",
    "validate_patch",
]

Doc: TypeAlias = Mapping[str, Any]


class Section(StrEnum):
    """The three writable parts of a twin, named by their path in the service document."""

    TAGS = "tags"
    DESIRED = "properties.desired"
    REPORTED = "properties.reported"


# Limits (IoT Hub ref §4.4).
SIZE_LIMITS: Final[Mapping[Section, int]] = {
    Section.TAGS: 8 * 1024,
    Section.DESIRED: 32 * 1024,
    Section.REPORTED: 32 * 1024,
}
MAX_DEPTH: Final = 10  # nested objects below a section's root; arrays count as a level too
MAX_KEY_BYTES: Final = 1024
MAX_STRING_BYTES: Final = 4096
MIN_INT: Final = -4503599627370496  # -2**52
MAX_INT: Final = 4503599627370495  # 2**52 - 1

LAST_UPDATED: Final = "$lastUpdated"
LAST_UPDATED_VERSION: Final = "$lastUpdatedVersion"
METADATA: Final = "$metadata"
VERSION: Final = "$version"

# Keys: no C0/C1 control characters (nor DEL), no '.', '$' or space (ref §4.4).
_BAD_KEY_CHAR: Final = re.compile(r"[\x00-\x20\x7f-\x9f.$]")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Fields of a full service twin (ref §4.2) that a service write may carry back and we ignore.
_READ_ONLY_FIELDS: Final = frozenset({
    "deviceId", "moduleId", "etag", "deviceEtag", "version", "status", "statusReason",
    "statusUpdateTime", "statusUpdatedTime", "connectionState", "connectionStateUpdatedTime",
    "lastActivityTime", "cloudToDeviceMessageCount", "authenticationType", "x509Thumbprint",
    "capabilities", "deviceScope", "parentScopes", "modelId", "generationId",
})
_TWIN_FIELDS: Final = frozenset({"deviceId", "moduleId", "etag", "version", "tags", "properties"})


def format_time(now: float) -> str:
    """Epoch seconds as IoT Hub's metadata timestamp, UTC ``YYYY-MM-DDTHH:MM:SS.mmmZ``
    (ref §4.3); milliseconds are truncated, never rounded up into the next second."""
    millis = math.floor(now * 1000)
    return f"{_second(millis // 1000)}.{millis % 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(epoch_second: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of one second (memoized: a burst of writes shares it)."""
    return f"{datetime.fromtimestamp(epoch_second, UTC):%Y-%m-%dT%H:%M:%S}"


def make_etag(version: int) -> str:
    """The twin etag for ``version``: 8 big-endian bytes, base64 (``"AAAAAAAAAAc="`` is 7)."""
    return b64encode(version.to_bytes(8, "big")).decode("ascii")


@dataclass(frozen=True, slots=True)
class Twin:
    """One device or module twin (IoT Hub ref §4.2). Never mutated; treat the trees as
    read-only: they are shared with earlier and later versions of the twin.

    ``desired``/``reported`` hold the properties without ``$version``/``$metadata``;
    ``desired_meta``/``reported_meta`` are the ``$metadata`` trees (ref §4.3). Tags have no
    metadata.

    ``sizes`` caches the sizes of tags, desired and reported as counted against their limits
    (:func:`section_size`), so a patch costs the size of the patch, not of the section; None
    (as when loaded from storage) means "compute on the next write"."""

    device_id: str
    module_id: str | None
    tags: Doc
    desired: Doc
    reported: Doc
    desired_meta: Doc
    reported_meta: Doc
    desired_version: int
    reported_version: int
    version: int
    etag: str
    sizes: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)

    def device_view(self, *, metadata: bool = False) -> dict[str, Any]:
        """The MQTT GET reply body (ref §4.1): ``{"desired": {..., "$version": n},
        "reported": {..., "$version": m}}``; ``$metadata`` only if asked for. A fresh copy."""
        return {
            "desired": _section_view(self.desired, self.desired_meta if metadata else None,
                                     self.desired_version),
            "reported": _section_view(self.reported, self.reported_meta if metadata else None,
                                      self.reported_version),
        }

    def document(self) -> dict[str, Any]:
        """The twin itself: ids, etag, version, tags and both property sections with their
        ``$metadata`` and ``$version``. This is the body of ``replaceTwin`` notifications and of
        identity lifecycle events (ref §10.5). A fresh copy."""
        doc: dict[str, Any] = {"deviceId": self.device_id}
        if self.module_id is not None:
            doc["moduleId"] = self.module_id
        doc["etag"] = self.etag
        doc["version"] = self.version
        doc["tags"] = _copy(self.tags)
        doc["properties"] = {
            "desired": _section_view(self.desired, self.desired_meta, self.desired_version),
            "reported": _section_view(self.reported, self.reported_meta, self.reported_version),
        }
        return doc

    def service_view(self, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The service REST twin (ref §4.2, §9.2): :meth:`document` plus the identity fields
        the caller passes (``status``, ``connectionState``, ``authenticationType``,
        ``x509Thumbprint``, ``capabilities``, ``deviceEtag``, ``lastActivityTime``, ...).
        Identity entries named like a twin-owned field (ids, etag, version, tags, properties)
        are ignored: the twin's own values win."""
        doc = self.document()
        view: dict[str, Any] = {key: doc.pop(key) for key in ("deviceId", "moduleId", "etag",
                                                              "version") if key in doc}
        for key, value in (identity or {}).items():
            if key not in _TWIN_FIELDS:
                view[key] = value
        view.update(doc)
        return view


def new_twin(device_id: str, module_id: str | None = None, *, now: float) -> Twin:
    """The twin of a freshly created identity: empty sections at ``$version`` 1, twin version
    1, root metadata stamped ``now``."""
    stamp = format_time(now)
    return Twin(
        device_id=device_id,
        module_id=module_id,
        tags={},
        desired={},
        reported={},
        desired_meta={LAST_UPDATED: stamp, LAST_UPDATED_VERSION: 1},
        reported_meta={LAST_UPDATED: stamp},
        desired_version=1,
        reported_version=1,
        version=1,
        etag=make_etag(1),
        sizes=(0, 0, 0),
    )


# --- operations -------------------------------------------------------------------------------

def patch_reported(twin: Twin, patch: Doc, *, now: float,
                   expected_version: int | None = None,
                   notify: bool = True) -> tuple[Twin, dict[str, Any]]:
    """Merge a device's reported-properties patch (ref §4.1 ``PATCH/properties/reported``).

    ``expected_version`` is the optional ``$version`` of the request: the reported
    ``$version`` the device believes current; a mismatch raises PreconditionFailedError.
    Returns the new twin and the ``updateTwin`` change-notification body (ref §10.5); with
    ``notify`` False (nobody will read the notification) that body is left empty."""
    if expected_version is not None and expected_version != twin.reported_version:
        raise PreconditionFailedError(
            f"{Section.REPORTED}: $version {expected_version} does not match the current "
            f"{twin.reported_version}")
    validate_patch(Section.REPORTED, patch)
    section_version = twin.reported_version + 1
    tags_size, desired_size, reported_size = _sizes(twin)
    reported_size = _check_size(Section.REPORTED,
                                reported_size + _size_delta(twin.reported, patch))
    stamp = {LAST_UPDATED: format_time(now)}
    reported, meta = _merge_with_meta(twin.reported, twin.reported_meta, patch, stamp)
    version = twin.version + 1
    new = replace(twin, reported=reported, reported_meta=meta, reported_version=section_version,
                  version=version, etag=make_etag(version),
                  sizes=(tags_size, desired_size, reported_size))
    if not notify:
        return new, {}
    change = {"version": version,
              "properties": {"reported": _change(patch, meta, section_version)}}
    return new, change


def patch_desired_and_tags(
    twin: Twin, body: Doc, *, now: float, if_match: str | None,
) -> tuple[Twin, dict[str, Any], dict[str, Any] | None]:
    """Apply a service ``PATCH /twins/{id}`` (ref §9.2): merge ``tags`` and
    ``properties.desired`` (JSON merge patch, ``null`` deletes).

    Returns the new twin, the ``updateTwin`` change-notification body (ref §10.5) and the
    desired patch to push to the connected device/module (the patch as applied, nulls kept,
    plus ``"$version"``), or None when the body has no desired section."""
    check_if_match(twin, if_match)
    tags_patch, desired_patch = _service_sections(body)
    for section, part in ((Section.TAGS, tags_patch), (Section.DESIRED, desired_patch)):
        if part is not None:
            validate_patch(section, part)
    version = twin.version + 1
    change: dict[str, Any] = {"version": version}
    tags, desired, desired_meta = twin.tags, twin.desired, twin.desired_meta
    desired_version = twin.desired_version
    tags_size, desired_size, reported_size = _sizes(twin)
    push: dict[str, Any] | None = None
    if tags_patch is not None:
        tags_size = _check_size(Section.TAGS, tags_size + _size_delta(tags, tags_patch))
    if desired_patch is not None:
        desired_size = _check_size(Section.DESIRED,
                                   desired_size + _size_delta(desired, desired_patch))
    if tags_patch is not None:
        tags = _merge(tags, tags_patch)
        change["tags"] = _copy(tags_patch)
    if desired_patch is not None:
        desired_version += 1
        stamp = {LAST_UPDATED: format_time(now), LAST_UPDATED_VERSION: desired_version}
        desired, desired_meta = _merge_with_meta(desired, desired_meta, desired_patch, stamp)
        change["properties"] = {"desired": _change(desired_patch, desired_meta, desired_version)}
        push = _copy(desired_patch)
        push[VERSION] = desired_version
    new = replace(twin, tags=tags, desired=desired, desired_meta=desired_meta,
                  desired_version=desired_version, version=version, etag=make_etag(version),
                  sizes=(tags_size, desired_size, reported_size))
    return new, change, push


def replace_twin(
    twin: Twin, body: Doc, *, now: float, if_match: str | None,
) -> tuple[Twin, dict[str, Any], dict[str, Any] | None]:
    """Apply a service ``PUT /twins/{id}`` (ref §9.2, §4.3 "Replace"): each of ``tags`` and
    ``properties.desired`` present in the body replaces that section whole; an absent section
    is kept (unverified against IoT Hub; it makes sending back a partial twin safe). Nulls are
    refused, as IoT Hub does ("Value of Property or Tag cannot be null").

    Returns the new twin, the ``replaceTwin`` notification body (the full twin,
    :meth:`Twin.document`) and, if desired was replaced, the patch to push: the whole new
    desired section with ``null`` for every key it no longer has (at any depth), so a device
    that merges patches ends up with exactly the new section, plus ``"$version"``."""
    check_if_match(twin, if_match)
    tags_body, desired_body = _service_sections(body)
    for section, part in ((Section.TAGS, tags_body), (Section.DESIRED, desired_body)):
        if part is not None:
            validate_patch(section, part, nulls=False)
    version = twin.version + 1
    tags, desired, desired_meta = twin.tags, twin.desired, twin.desired_meta
    desired_version = twin.desired_version
    tags_size, desired_size, reported_size = _sizes(twin)
    push: dict[str, Any] | None = None
    if tags_body is not None:
        tags_size = _check_size(Section.TAGS, section_size(tags_body))
    if desired_body is not None:
        desired_size = _check_size(Section.DESIRED, section_size(desired_body))
    if tags_body is not None:
        tags = _merge({}, tags_body)
    if desired_body is not None:
        desired_version += 1
        stamp = {LAST_UPDATED: format_time(now), LAST_UPDATED_VERSION: desired_version}
        desired, desired_meta = _merge_with_meta({}, {}, desired_body, stamp)
        push = _replacement_patch(twin.desired, desired)
        push[VERSION] = desired_version
    new = replace(twin, tags=tags, desired=desired, desired_meta=desired_meta,
                  desired_version=desired_version, version=version, etag=make_etag(version),
                  sizes=(tags_size, desired_size, reported_size))
    return new, new.document(), push


def check_if_match(twin: Twin, if_match: str | None) -> None:
    """Optimistic concurrency for service writes (ref §4.3, §9.2): None (no header), ``*``, or
    the twin's etag, bare or quoted (the SDK quotes it; a weak ``W/`` prefix is tolerated).
    Anything else raises PreconditionFailedError."""
    if if_match is None:
        return
    value = if_match.strip().removeprefix("W/")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if value != "*" and value != twin.etag:
        raise PreconditionFailedError(
            f"twin {_name(twin)}: If-Match {if_match!r} does not match etag {twin.etag!r}")


# --- limits (ref §4.4) --------------------------------------------------------------------------

def validate_patch(section: Section, patch: Any, *, nulls: bool = True) -> None:
    """Check a patch (or a replacement section) against the key and value rules of ref §4.4:
    a JSON object; keys non-empty, at most 1 KB of UTF-8, without ``.``, ``$``, space or
    control characters; string values at most 4 KB of UTF-8; integers within
    -2**52 .. 2**52-1; floats finite; objects (and arrays) nested at most 10 deep below the
    section root; no null inside arrays; ``null`` elsewhere only if ``nulls`` (it deletes).

    Raises InvalidRequestError naming the offending path (``properties.desired.a.b``) and the
    limit. Section sizes are checked on the merge result, not here (see :func:`section_size`)."""
    if not isinstance(patch, Mapping):
        raise InvalidRequestError(f"{section}: must be a JSON object, not {_kind(patch)}")
    _check_object(patch, section.value, 0, nulls)


def section_size(doc: Doc) -> int:
    """The size IoT Hub counts against a section's limit (ref §4.4): for every property the
    UTF-8 length of its key plus the size of its value; strings count their UTF-8 bytes
    without control characters, numbers 8, booleans 4, objects the sum of their properties.
    Arrays (the reference is silent) count the sum of their elements."""
    total = 0
    for key, value in doc.items():
        if value is not None:  # a patch's null takes no room
            total += _text_size(key) + _value_size(value)
    return total


def _size_delta(doc: Doc, patch: Doc) -> int:
    """How much merging ``patch`` into ``doc`` changes :func:`section_size`, walking only the
    patch and the parts of ``doc`` it replaces."""
    delta = 0
    for key, value in patch.items():
        old = doc.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            delta += _size_delta(old, value)
            continue
        if old is not None:
            delta -= _text_size(key) + _value_size(old)
        if value is not None:
            delta += _text_size(key) + _value_size(value)
    return delta


def _sizes(twin: Twin) -> tuple[int, int, int]:
    if twin.sizes is not None:
        return twin.sizes
    return section_size(twin.tags), section_size(twin.desired), section_size(twin.reported)


def _check_object(obj: Doc, path: str, depth: int, nulls: bool) -> None:
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InvalidRequestError(f"{path}: keys must be strings, not {_kind(key)}")
        if not key:
            raise InvalidRequestError(f"{path}: empty key")
        if len(key) * 4 > MAX_KEY_BYTES and len(key.encode()) > MAX_KEY_BYTES:
            raise InvalidRequestError(
                f"{path}: key {key[:16]!r}... is {len(key.encode())} bytes of UTF-8, over the "
                f"limit of {MAX_KEY_BYTES}")
        bad = _BAD_KEY_CHAR.search(key)
        if bad is not None:
            raise InvalidRequestError(
                f"{path}: key {key!r} contains {bad.group()!r}; keys must not contain '.', "
                f"'$', space or control characters")
        _check_value(value, f"{path}.{key}", depth, nulls)


def _check_value(value: Any, path: str, depth: int, nulls: bool) -> None:
    """``depth``: how many objects/arrays below the section root hold ``value``."""
    if value is None:
        if not nulls:
            where = "inside an array" if path.endswith("]") else "in a replacement"
            raise InvalidRequestError(f"{path}: null is not allowed {where}")
    elif isinstance(value, str):
        if len(value) * 4 > MAX_STRING_BYTES and len(value.encode()) > MAX_STRING_BYTES:
            raise InvalidRequestError(
                f"{path}: string is {len(value.encode())} bytes of UTF-8, over the limit of "
                f"{MAX_STRING_BYTES}")
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not MIN_INT <= value <= MAX_INT:
            raise InvalidRequestError(
                f"{path}: integer {value} is outside {MIN_INT}..{MAX_INT}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequestError(f"{path}: number {value} is not finite")
    elif isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            raise InvalidRequestError(
                f"{path}: nesting depth {depth + 1} is over the limit of {MAX_DEPTH}")
        _check_object(value, path, depth + 1, nulls)
    elif isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise InvalidRequestError(
                f"{path}: nesting depth {depth + 1} is over the limit of {MAX_DEPTH}")
        for index, item in enumerate(value):
            _check_value(item, f"{path}[{index}]", depth + 1, False)
    else:
        raise InvalidRequestError(f"{path}: {_kind(value)} is not a JSON value")


def _check_size(section: Section, size: int) -> int:
    """``size`` (of a section after a write) if within the section's limit, else raise."""
    limit = SIZE_LIMITS[section]
    if size > limit:
        raise InvalidRequestError(
            f"{section}: size would be {size} bytes, over the limit of {limit}")
    return size


def _text_size(text: str) -> int:
    if text.isascii():
        return len(text) if text.isprintable() else len(text) - len(_CONTROL.findall(text))
    size = len(text.encode())
    for char in _CONTROL.findall(text):
        size -= 1 if char < "\x80" else 2  # C0 and DEL are 1 byte of UTF-8, C1 are 2
    return size


def _value_size(value: Any) -> int:
    if isinstance(value, str):
        return _text_size(value)
    if isinstance(value, bool):
        return 4
    if isinstance(value, (int, float)):
        return 8
    if isinstance(value, Mapping):
        return section_size(value)
    if isinstance(value, (list, tuple)):
        return sum(_value_size(item) for item in value)
    return 0  # null: only ever transient


# --- merging and metadata (ref §4.3) ------------------------------------------------------------

def _merge(doc: Doc, patch: Doc) -> dict[str, Any]:
    """JSON merge patch (RFC 7396, as IoT Hub applies it; ref §4.3): objects merge
    recursively, ``null`` removes, anything else (arrays included) replaces. Copy-on-write:
    only the objects on the patched paths are new; the rest is shared with ``doc``."""
    out = dict(doc)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping):
            current = out.get(key)
            out[key] = _merge(current if isinstance(current, Mapping) else {}, value)
        else:
            out[key] = _copy(value)
    return out


def _merge_with_meta(doc: Doc, meta: Doc, patch: Doc,
                     stamp: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`_merge`, with the ``$metadata`` tree merged alongside (ref §4.3): every object
    level on a patched path and every written leaf gets ``stamp`` (one shared mapping, never
    mutated); removed keys lose their metadata and their parent's stamp records the removal."""
    out = dict(doc)
    out_meta = {**meta, **stamp}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
            out_meta.pop(key, None)
        elif isinstance(value, Mapping):
            current = out.get(key)
            if isinstance(current, Mapping):
                out[key], out_meta[key] = _merge_with_meta(current, meta.get(key, {}), value,
                                                           stamp)
            else:
                out[key], out_meta[key] = _merge_with_meta({}, {}, value, stamp)
        else:
            out[key] = _copy(value)
            out_meta[key] = stamp
    return out, out_meta


def _change(patch: Doc, meta: Doc, section_version: int) -> dict[str, Any]:
    """A section's part of an ``updateTwin`` notification (ref §10.5): the patch as applied
    (nulls for removals), the metadata of what it wrote, and the new ``$version``."""
    body: dict[str, Any] = _copy(patch)
    body[METADATA] = _patched_meta(meta, patch)
    body[VERSION] = section_version
    return body


def _patched_meta(meta: Doc, patch: Doc) -> dict[str, Any]:
    out = {key: value for key, value in meta.items() if key[:1] == "$"}
    for key, value in patch.items():
        if value is None or key not in meta:
            continue
        child = meta[key]
        out[key] = _patched_meta(child, value) if isinstance(value, Mapping) else _copy(child)
    return out


def _replacement_patch(old: Doc, new: Doc) -> dict[str, Any]:
    """``new`` as a merge patch over ``old``: ``new`` itself, plus ``null`` for each key of
    ``old`` it lacks, recursively where both sides hold an object."""
    out: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            out[key] = _replacement_patch(before, value)
        else:
            out[key] = _copy(value)
    for key in old:
        if key not in new:
            out[key] = None
    return out


def _service_sections(body: Any) -> tuple[Doc | None, Doc | None]:
    """``(tags, desired)`` of a service write body; None for a section it does not carry."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError(f"twin: body must be a JSON object, not {_kind(body)}")
    for key in body:
        if key not in _READ_ONLY_FIELDS and key not in ("tags", "properties"):
            raise InvalidRequestError(f"twin: unknown field {key!r}")
    tags = body.get("tags")
    properties = body.get("properties")
    desired = None
    if properties is not None:
        if not isinstance(properties, Mapping):
            raise InvalidRequestError(
                f"properties: must be a JSON object, not {_kind(properties)}")
        for key in properties:
            if key not in ("desired", "reported"):
                raise InvalidRequestError(f"properties: unknown field {key!r}")
        desired = properties.get("desired")
    if tags is not None and not isinstance(tags, Mapping):
        raise InvalidRequestError(f"{Section.TAGS}: must be a JSON object, not {_kind(tags)}")
    if desired is not None:
        if not isinstance(desired, Mapping):
            raise InvalidRequestError(
                f"{Section.DESIRED}: must be a JSON object, not {_kind(desired)}")
        if METADATA in desired or VERSION in desired:
            desired = {k: v for k, v in desired.items() if k not in (METADATA, VERSION)}
    return tags, desired


# --- small helpers ----------------------------------------------------------------------------

def _section_view(doc: Doc, meta: Doc | None, version: int) -> dict[str, Any]:
    view: dict[str, Any] = _copy(doc)
    if meta is not None:
        view[METADATA] = _copy(meta)
    view[VERSION] = version
    return view


def _copy(value: Any) -> Any:
    """A deep copy of a JSON tree (dicts and lists are rebuilt, scalars shared)."""
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(item) for item in value]
    return value


def _kind(value: Any) -> str:
    """How an error message names a value's JSON type."""
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return f"a {type(value).__name__}"


def _name(twin: Twin) -> str:
    return twin.device_id if twin.module_id is None else f"{twin.device_id}/{twin.module_id}"
