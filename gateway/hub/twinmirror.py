"""Desired properties mirrored from the parent (federation; IoT Hub ref §4.3). Pure.

Desired properties of an identity behind gateways belong to whoever set them upstream: the
twin at the hop nearest the device is a mirror whose desired ``$version`` is the owner's own.
A change arrives as ``(version, patch, desired)`` - the owner's new version, the patch as the
owner applied it (None on a resend of the state) and the owner's whole desired section:

* ``version <= ours``: already applied (a resend, a reordered duplicate): nothing to do
  (except the first time: the section is then marked as the owner's);
* ``version == ours + 1`` and a patch: the patch is merged, the device gets that patch;
* otherwise (patches were missed while a link was down): the section is replaced by the
  owner's, the device gets the difference as one patch (nulls for removed keys).

So a device sees each owner version at most once and in increasing order; none is lost
because every resend carries the whole state. Returns None when there is nothing to do, else
the new twin, the ``updateTwin`` notification body and the patch to push (with ``$version``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final

from gateway.hub.twins import (
    LAST_UPDATED,
    LAST_UPDATED_VERSION,
    VERSION,
    Doc,
    Twin,
    _change,
    _copy,
    _merge_with_meta,
    _replacement_patch,
    format_time,
    make_etag,
)


OWNER: Final = "$owner"
"""Root key of the desired ``$metadata``: the hub that owns a mirrored section (shown by
``gateway twin show``; local desired writes to it are refused, naming it)."""


def owner_of(twin: Twin) -> str | None:
    owner = twin.desired_meta.get(OWNER)
    return owner if isinstance(owner, str) else None


def mirror_desired(twin: Twin, *, version: int, patch: Doc | None, desired: Doc, owner: str,
                   now: float) -> tuple[Twin, dict[str, Any], dict[str, Any] | None] | None:
    if version < twin.desired_version or (version == twin.desired_version
                                          and owner_of(twin) is not None):
        return None  # the first state at our own version only marks the owner
    stamp = {LAST_UPDATED: format_time(now), LAST_UPDATED_VERSION: version}
    if patch is not None and version == twin.desired_version + 1:
        applied = {k: v for k, v in patch.items() if k != VERSION}
        new_desired, meta = _merge_with_meta(twin.desired, twin.desired_meta, applied, stamp)
    else:
        clean = {k: v for k, v in desired.items() if k[:1] != "$"}
        new_desired, meta = _merge_with_meta({}, {}, clean, stamp)
        applied = _replacement_patch(twin.desired, new_desired)
    meta = {**meta, OWNER: owner}
    twin_version = twin.version + 1
    new = replace(twin, desired=new_desired, desired_meta=meta, desired_version=version,
                  version=twin_version, etag=make_etag(twin_version), sizes=None)
    change: dict[str, Any] = {"version": twin_version,
                              "properties": {"desired": _change(applied, meta, version)}}
    if version == twin.desired_version and not applied:
        return new, change, None  # nothing new for the device
    push = _copy(applied)
    push[VERSION] = version
    return new, change, push
