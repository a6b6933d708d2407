"""The pure twin model (IoT Hub ref §4): merge patches, metadata, versions, etags, limits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidRequestError, PreconditionFailedError
from gateway.hub.twins import (
    MAX_INT,
    MIN_INT,
    Section,
    Twin,
    format_time,
    make_etag,
    new_twin,
    patch_desired_and_tags,
    patch_reported,
    replace_twin,
    section_size,
    validate_patch,
)

REPO = Path(__file__).resolve().parents[2]
T0 = 1_717_243_200.0  # 2024-06-01T12:00:00Z
TS0 = "2024-06-01T12:00:00.000Z"


def at(seconds: float) -> str:
    return format_time(T0 + seconds)


def fresh(module_id: str | None = None) -> Twin:
    return new_twin("devA", module_id, now=T0)


def reported(twin: Twin, patch: dict[str, Any], t: float = 1.0, **kw: Any) -> Twin:
    return patch_reported(twin, patch, now=T0 + t, **kw)[0]


def desired(twin: Twin, patch: dict[str, Any], t: float = 1.0) -> Twin:
    return patch_desired_and_tags(twin, {"properties": {"desired": patch}}, now=T0 + t,
                                  if_match=None)[0]


# --- a reference merge (RFC 7396 §2, written from the pseudo-code) and JSON strategies -----------

def ref_merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = ref_merge(result.get(key), value)
    return result


KEYS = st.sampled_from(["a", "b", "c", "ключ", "x_y"])
SCALARS = st.one_of(
    st.integers(MIN_INT, MAX_INT), st.booleans(), st.text(max_size=8),
    st.floats(allow_nan=False, allow_infinity=False),
)
VALUES = st.recursive(
    SCALARS | st.lists(SCALARS, max_size=3),
    lambda inner: st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
PATCH_VALUES = st.recursive(
    SCALARS | st.none() | st.lists(SCALARS, max_size=3),
    lambda inner: st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
PATCHES = st.dictionaries(KEYS, PATCH_VALUES, max_size=4)


def meta_mirrors(doc: Any, meta: Any, *, desired: bool) -> None:
    """Every key of the document has a metadata node; objects recurse; nothing else."""
    assert isinstance(meta, dict) and "$lastUpdated" in meta
    assert ("$lastUpdatedVersion" in meta) == desired
    if isinstance(doc, dict):
        assert {k for k in meta if not k.startswith("$")} == set(doc)
        for key, value in doc.items():
            meta_mirrors(value, meta[key], desired=desired)
    else:
        assert set(meta) <= {"$lastUpdated", "$lastUpdatedVersion"}


def written_paths(patch: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths a patch writes: every non-null entry and every object level on the way."""
    paths = {prefix}
    for key, value in patch.items():
        if value is None:
            continue
        if isinstance(value, dict):
            paths |= written_paths(value, (*prefix, key))
        else:
            paths.add((*prefix, key))
    return paths


def node(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def meta_paths(meta: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    paths = {prefix}
    for key, value in meta.items():
        if not key.startswith("$"):
            paths |= meta_paths(value, (*prefix, key))
    return paths


# --- the new twin, views, etag, time ----------------------------------------------------------

def test_new_twin_has_empty_sections_at_version_one() -> None:
    twin = fresh()
    assert (twin.version, twin.desired_version, twin.reported_version) == (1, 1, 1)
    assert twin.etag == "AAAAAAAAAAE="
    assert twin.device_view() == {"desired": {"$version": 1}, "reported": {"$version": 1}}
    assert twin.desired_meta == {"$lastUpdated": TS0, "$lastUpdatedVersion": 1}
    assert twin.reported_meta == {"$lastUpdated": TS0}


def test_etag_is_the_version_as_eight_big_endian_bytes_in_base64() -> None:
    assert make_etag(7) == "AAAAAAAAAAc="  # the example of ref §4.2
    assert make_etag(2**40 + 1) == "AAABAAAAAAE="


def test_format_time_is_utc_with_truncated_milliseconds() -> None:
    assert format_time(T0) == TS0
    assert format_time(T0 + 1.2345) == "2024-06-01T12:00:01.234Z"
    assert format_time(T0 + 59.9999) == "2024-06-01T12:00:59.999Z"
    assert format_time(0) == "1970-01-01T00:00:00.000Z"


def test_device_view_is_the_mqtt_get_body_without_metadata_unless_asked() -> None:
    twin = desired(reported(fresh(), {"batteryLevel": 55}), {"telemetrySendFrequency": "5m"})
    assert twin.device_view() == {
        "desired": {"telemetrySendFrequency": "5m", "$version": 2},
        "reported": {"batteryLevel": 55, "$version": 2},
    }
    with_meta = twin.device_view(metadata=True)
    assert with_meta["reported"]["$metadata"] == twin.reported_meta
    assert list(with_meta["desired"]) == ["telemetrySendFrequency", "$metadata", "$version"]


def test_service_view_merges_identity_fields_but_keeps_the_twins_own() -> None:
    twin = reported(fresh("m1"), {"a": 1})
    identity = {"status": "enabled", "connectionState": "Connected", "authenticationType": "sas",
                "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
                "deviceEtag": "MTIz", "etag": "forged", "version": 99, "deviceId": "other",
                "tags": {"no": 1}}
    view = twin.service_view(identity)
    assert view["deviceId"] == "devA" and view["moduleId"] == "m1"
    assert view["etag"] == twin.etag and view["version"] == 2 and view["tags"] == {}
    assert view["status"] == "enabled" and view["deviceEtag"] == "MTIz"
    assert view["properties"]["reported"] == {"a": 1, "$metadata": twin.reported_meta,
                                              "$version": 2}
    assert "moduleId" not in fresh().service_view({})


def test_views_are_copies_the_caller_may_change() -> None:
    twin = reported(fresh(), {"a": {"b": [1, 2]}})
    snapshot = copy.deepcopy(twin)
    twin.device_view(metadata=True)["reported"]["a"]["b"].append(3)
    twin.service_view({})["properties"]["reported"]["$metadata"]["a"]["$lastUpdated"] = "x"
    twin.document()["tags"]["t"] = 1
    assert twin == snapshot


# --- merge semantics (ref §4.3) ---------------------------------------------------------------

def test_objects_merge_nulls_delete_and_arrays_replace_whole() -> None:
    twin = reported(fresh(), {"a": {"b": 1, "c": 2}, "list": [1, 2, 3], "gone": "x"})
    twin = reported(twin, {"a": {"c": None, "d": {"e": True}}, "list": [9], "gone": None,
                           "missing": None}, t=2)
    assert twin.reported == {"a": {"b": 1, "d": {"e": True}}, "list": [9]}


def test_an_object_replacing_a_scalar_drops_its_nulls() -> None:
    twin = reported(fresh(), {"a": 1})
    twin = reported(twin, {"a": {"b": None, "c": {"d": None, "e": 1}}}, t=2)
    assert twin.reported == {"a": {"c": {"e": 1}}}


@settings(max_examples=300, deadline=None)
@given(st.lists(PATCHES, min_size=1, max_size=6))
def test_reported_merge_matches_the_reference_merge(patches: list[dict[str, Any]]) -> None:
    twin = fresh()
    expected: dict[str, Any] = {}
    for step, patch in enumerate(patches, start=1):
        previous = twin
        twin, change = patch_reported(twin, patch, now=T0 + step)
        expected = ref_merge(expected, patch)
        assert twin.reported == expected
        assert twin.sizes == (0, 0, section_size(expected))
        assert twin.reported_version == previous.reported_version + 1
        assert twin.version == previous.version + 1 and twin.etag == make_etag(twin.version)
        meta_mirrors(twin.reported, twin.reported_meta, desired=False)
        written = written_paths(patch)
        for path in meta_paths(twin.reported_meta):
            stamp = node(twin.reported_meta, path)["$lastUpdated"]
            if path in written:
                assert stamp == at(step)
            else:  # untouched: it existed before, with its old stamp
                assert stamp == node(previous.reported_meta, path)["$lastUpdated"]
        assert change["properties"]["reported"]["$version"] == twin.reported_version
        assert json.loads(json.dumps(change)) == change


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), PATCHES, PATCHES), min_size=1, max_size=6))
def test_pushed_desired_patches_bring_a_merging_device_to_the_new_desired(
    steps: list[tuple[bool, dict[str, Any], dict[str, Any]]],
) -> None:
    twin = fresh()
    device_copy: dict[str, Any] = {}
    tags: dict[str, Any] = {}
    for step, (whole, desired_body, tags_body) in enumerate(steps, start=1):
        body = {"tags": tags_body, "properties": {"desired": desired_body}}
        if whole:
            clean = ref_merge({}, desired_body)
            body = {"tags": ref_merge({}, tags_body), "properties": {"desired": clean}}
            twin, _, push = replace_twin(twin, body, now=T0 + step, if_match=twin.etag)
            tags = ref_merge({}, tags_body)
        else:
            twin, _, push = patch_desired_and_tags(twin, body, now=T0 + step, if_match="*")
            tags = ref_merge(tags, tags_body)
        assert push is not None and push.pop("$version") == twin.desired_version == step + 1
        device_copy = ref_merge(device_copy, push)
        assert device_copy == twin.desired
        assert twin.tags == tags
        assert twin.sizes == (section_size(tags), section_size(twin.desired), 0)
        meta_mirrors(twin.desired, twin.desired_meta, desired=True)


def test_patches_never_change_the_old_twin_or_keep_the_callers_objects() -> None:
    before = reported(fresh(), {"a": {"b": [1]}, "c": 1})
    snapshot = copy.deepcopy(before)
    patch: dict[str, Any] = {"a": {"b": [2], "n": {"x": 1}}, "c": None}
    after = reported(before, patch, t=2)
    assert before == snapshot
    patch["a"]["b"].append(3)
    patch["a"]["n"]["x"] = 2
    assert after.reported == {"a": {"b": [2], "n": {"x": 1}}}


# --- metadata and versions (ref §4.3) --------------------------------------------------------

def test_metadata_stamps_every_written_level_and_keeps_the_rest() -> None:
    twin = reported(fresh(), {"telemetryConfig": {"sendFrequency": "5m", "status": "ok"},
                              "batteryLevel": 55}, t=1)
    twin = reported(twin, {"telemetryConfig": {"status": "success"}}, t=2)
    assert twin.reported_meta == {
        "$lastUpdated": at(2),
        "telemetryConfig": {"$lastUpdated": at(2),
                            "sendFrequency": {"$lastUpdated": at(1)},
                            "status": {"$lastUpdated": at(2)}},
        "batteryLevel": {"$lastUpdated": at(1)},
    }


def test_removing_a_key_drops_its_metadata_and_stamps_its_parent() -> None:
    twin = reported(fresh(), {"cfg": {"a": 1, "b": 2}}, t=1)
    twin = reported(twin, {"cfg": {"a": None}}, t=5)
    assert twin.reported_meta["cfg"] == {"$lastUpdated": at(5), "b": {"$lastUpdated": at(1)}}


def test_desired_metadata_carries_the_version_of_the_write() -> None:
    twin = desired(fresh(), {"telemetryConfig": {"sendFrequency": "5m"}}, t=1)
    twin = desired(twin, {"other": 1}, t=2)
    assert twin.desired_version == 3
    assert twin.desired_meta == {
        "$lastUpdated": at(2), "$lastUpdatedVersion": 3,
        "telemetryConfig": {"$lastUpdated": at(1), "$lastUpdatedVersion": 2,
                            "sendFrequency": {"$lastUpdated": at(1), "$lastUpdatedVersion": 2}},
        "other": {"$lastUpdated": at(2), "$lastUpdatedVersion": 3},
    }


def test_a_patch_that_changes_no_value_is_still_a_new_version() -> None:
    twin = reported(fresh(), {"a": 1}, t=1)
    again, change = patch_reported(twin, {"a": 1}, now=T0 + 2)
    assert again.reported == twin.reported
    assert again.reported_version == twin.reported_version + 1
    assert again.version == twin.version + 1 and again.etag != twin.etag
    assert again.reported_meta["a"] == {"$lastUpdated": at(2)}
    assert change["properties"]["reported"]["a"] == 1
    empty, _ = patch_reported(again, {}, now=T0 + 3)
    assert empty.reported_version == again.reported_version + 1


def test_sections_keep_their_own_versions() -> None:
    twin = reported(fresh(), {"a": 1})
    twin = desired(twin, {"b": 1})
    tagged, _, push = patch_desired_and_tags(twin, {"tags": {"t": 1}}, now=T0 + 3, if_match="*")
    assert push is None
    assert (tagged.version, tagged.desired_version, tagged.reported_version) == (4, 2, 2)
    assert tagged.desired_meta == twin.desired_meta


def test_reported_expected_version_must_match_the_current_one() -> None:
    twin = reported(fresh(), {"a": 1})
    assert reported(twin, {"a": 2}, expected_version=2).reported == {"a": 2}
    with pytest.raises(PreconditionFailedError, match=r"\$version 1 does not match .* 2"):
        patch_reported(twin, {"a": 2}, now=T0, expected_version=1)


# --- notifications (ref §10.5) and pushes (ref §4.1) -------------------------------------------

def test_update_notification_has_the_shape_of_the_reference_example() -> None:
    twin = desired(fresh(), {"property1": "old"}, t=1)
    twin = patch_reported(twin, {"r": 1}, now=T0 + 2)[0]
    twin = desired(twin, {"property1": "old2"}, t=3)
    twin = desired(twin, {"property1": "older"}, t=4)
    twin = desired(twin, {"property1": "oldest"}, t=5)
    assert (twin.version, twin.desired_version) == (6, 5)
    body = {"tags": {"tag1": "new value"}, "properties": {"desired": {"property1": "new value"}}}
    _, change, push = patch_desired_and_tags(twin, body, now=T0 + 6, if_match=None)
    assert change == {
        "version": 7,
        "tags": {"tag1": "new value"},
        "properties": {"desired": {
            "property1": "new value",
            "$metadata": {"$lastUpdated": at(6), "$lastUpdatedVersion": 6,
                          "property1": {"$lastUpdated": at(6), "$lastUpdatedVersion": 6}},
            "$version": 6}},
    }
    assert push == {"property1": "new value", "$version": 6}


def test_reported_notification_keeps_nulls_and_only_the_written_metadata() -> None:
    twin = reported(fresh(), {"keep": 1, "cfg": {"a": 1, "b": 2}}, t=1)
    _, change = patch_reported(twin, {"cfg": {"a": None, "c": 3}}, now=T0 + 2)
    assert change == {"version": 3, "properties": {"reported": {
        "cfg": {"a": None, "c": 3},
        "$metadata": {"$lastUpdated": at(2),
                      "cfg": {"$lastUpdated": at(2), "c": {"$lastUpdated": at(2)}}},
        "$version": 3}}}


def test_desired_push_keeps_nulls_and_carries_the_new_version() -> None:
    twin = desired(fresh(), {"route": "x", "f": "1m"})
    _, _, push = patch_desired_and_tags(
        twin, {"properties": {"desired": {"f": "5m", "route": None}}}, now=T0, if_match=None)
    assert push == {"f": "5m", "route": None, "$version": 3}  # ref §4.1 example shape


def test_service_writes_ignore_read_only_fields_and_refuse_unknown_ones() -> None:
    twin = reported(fresh(), {"r": 1})
    full = twin.service_view({"status": "enabled", "connectionState": "Disconnected"})
    full["properties"]["desired"]["x"] = 1
    full["properties"]["reported"]["r"] = 2
    new, _, push = patch_desired_and_tags(twin, full, now=T0 + 1, if_match=full["etag"])
    assert new.desired == {"x": 1} and new.reported == {"r": 1}
    assert push == {"x": 1, "$version": 2}
    with pytest.raises(InvalidRequestError, match="unknown field 'colour'"):
        patch_desired_and_tags(twin, {"colour": 1}, now=T0, if_match=None)
    with pytest.raises(InvalidRequestError, match="properties: unknown field 'wanted'"):
        patch_desired_and_tags(twin, {"properties": {"wanted": {}}}, now=T0, if_match=None)
    with pytest.raises(InvalidRequestError, match="tags: must be a JSON object, not an array"):
        patch_desired_and_tags(twin, {"tags": []}, now=T0, if_match=None)


def test_replace_swaps_present_sections_keeps_absent_ones_and_sends_the_full_twin() -> None:
    twin = patch_desired_and_tags(
        fresh(), {"tags": {"t": 1}, "properties": {"desired": {"a": {"x": 1, "y": 2}, "b": 1}}},
        now=T0 + 1, if_match=None)[0]
    twin = reported(twin, {"r": 1}, t=2)
    new, change, push = replace_twin(twin, {"properties": {"desired": {"a": {"x": 1}}}},
                                     now=T0 + 3, if_match=f'"{twin.etag}"')
    assert new.tags == {"t": 1} and new.desired == {"a": {"x": 1}} and new.reported == {"r": 1}
    assert push == {"a": {"x": 1, "y": None}, "b": None, "$version": 3}
    assert change == new.document()
    assert change["properties"]["desired"]["$metadata"]["a"] == {
        "$lastUpdated": at(3), "$lastUpdatedVersion": 3,
        "x": {"$lastUpdated": at(3), "$lastUpdatedVersion": 3}}
    retagged, _, no_push = replace_twin(new, {"tags": {}}, now=T0 + 4, if_match="*")
    assert retagged.tags == {} and no_push is None and retagged.desired_version == 3


def test_replace_refuses_nulls() -> None:
    with pytest.raises(InvalidRequestError, match=r"tags\.my-tag: null is not allowed"):
        replace_twin(fresh(), {"tags": {"my-tag": None}}, now=T0, if_match=None)


# --- If-Match (ref §4.3, §9.2) -----------------------------------------------------------------

@pytest.mark.parametrize("if_match", [None, "*", '"*"', "AAAAAAAAAAI=", '"AAAAAAAAAAI="',
                                      'W/"AAAAAAAAAAI="', ' "AAAAAAAAAAI=" '])
def test_if_match_accepts_none_star_and_the_etag_bare_or_quoted(if_match: str | None) -> None:
    twin = reported(fresh(), {"a": 1})
    assert twin.etag == "AAAAAAAAAAI="
    body = {"tags": {"t": 1}}
    assert patch_desired_and_tags(twin, body, now=T0, if_match=if_match)[0].tags == {"t": 1}
    assert replace_twin(twin, body, now=T0, if_match=if_match)[0].tags == {"t": 1}


@pytest.mark.parametrize("if_match", ["AAAAAAAAAAE=", '"AAAAAAAAAAE="', "", '""', "junk"])
def test_if_match_with_another_etag_is_a_failed_precondition(if_match: str) -> None:
    twin = reported(fresh(), {"a": 1})  # etag moved on from AAAAAAAAAAE=
    for operation in (patch_desired_and_tags, replace_twin):
        with pytest.raises(PreconditionFailedError, match="does not match etag"):
            operation(twin, {"tags": {"t": 1}}, now=T0, if_match=if_match)


# --- limits (ref §4.4) ------------------------------------------------------------------------

def filler(size: int, prefix: str = "k") -> dict[str, str]:
    """A flat section of exactly ``size`` bytes by the counting rule (4-byte keys)."""
    doc: dict[str, str] = {}
    index = 0
    while size > 0:
        key = f"{prefix}{index:03d}"
        chunk = min(size - len(key), 4096)
        assert chunk >= 0
        doc[key] = "x" * chunk
        size -= len(key) + chunk
        index += 1
    return doc


def test_size_counts_keys_strings_numbers_booleans_and_nesting() -> None:
    assert section_size({}) == 0
    assert section_size({"ab": "xyz"}) == 5
    assert section_size({"n": 1, "f": 1.5, "b": True}) == 1 + 8 + 1 + 8 + 1 + 4
    assert section_size({"o": {"ab": {"c": 1}}}) == 1 + 2 + 1 + 8
    assert section_size({"é": "€"}) == 2 + 3  # UTF-8 bytes
    assert section_size({"s": "a\x00b\x1f\x7f\x85c"}) == 1 + 3  # control characters skipped
    assert section_size({"s": "a\x00\x1f\x7f"}) == 1 + 1
    assert section_size({"a": [1, "xy", True, {"k": 1}]}) == 1 + 8 + 2 + 4 + 1 + 8
    assert section_size(filler(32768)) == 32768


@pytest.mark.parametrize(("section", "limit"), [(Section.TAGS, 8192),
                                                (Section.DESIRED, 32768),
                                                (Section.REPORTED, 32768)])
def test_section_size_limit_exact_boundary(section: Section, limit: int) -> None:
    def write(twin: Twin, patch: dict[str, Any]) -> Twin:
        if section is Section.REPORTED:
            return reported(twin, patch)
        if section is Section.TAGS:
            return patch_desired_and_tags(twin, {"tags": patch}, now=T0, if_match=None)[0]
        return desired(twin, patch)

    full = write(fresh(), filler(limit))
    assert full.sizes is not None and limit in full.sizes
    with pytest.raises(InvalidRequestError, match=rf"{section}: size would be {limit + 1} "
                                                  rf"bytes, over the limit of {limit}"):
        write(fresh(), filler(limit + 1))
    with pytest.raises(InvalidRequestError, match=f"size would be {limit + 5}"):
        write(full, {"k000": None, "more": "x" * 4096, "mo": "xyz"})  # the result counts
    assert write(full, {"k000": None, "k001": None, "new": "y"}).sizes is not None
    if section is not Section.REPORTED:
        body: dict[str, Any] = ({"tags": filler(limit + 1)} if section is Section.TAGS
                                else {"properties": {"desired": filler(limit + 1)}})
        with pytest.raises(InvalidRequestError, match=f"over the limit of {limit}"):
            replace_twin(fresh(), body, now=T0, if_match=None)


def test_size_limit_holds_for_a_twin_loaded_without_cached_sizes() -> None:
    full = reported(fresh(), filler(32768))
    loaded = Twin(**{name: getattr(full, name) for name in Twin.__dataclass_fields__
                     if name != "sizes"})
    assert loaded.sizes is None and loaded == full
    with pytest.raises(InvalidRequestError, match="size would be 32769"):
        reported(loaded, {"z": ""})
    assert reported(loaded, {"k000": "x" * 4095, "z": ""}).sizes == (0, 0, 32768)


def nested(levels: int, leaf: Any = "value") -> dict[str, Any]:
    doc: Any = leaf
    for level in range(levels, 0, -1):
        doc = {f"l{level}": doc}
    return doc  # type: ignore[no-any-return]


def test_depth_ten_is_allowed_and_eleven_refused() -> None:
    ok = nested(10, {"property": "value"})  # the docs' example: one..ten, then a leaf
    assert reported(fresh(), ok).reported == ok
    with pytest.raises(InvalidRequestError,
                       match=r"l1\.l2\.l3\.l4\.l5\.l6\.l7\.l8\.l9\.l10\.l11: nesting depth 11 "
                             r"is over the limit of 10"):
        reported(fresh(), nested(11, {"property": "value"}))
    with pytest.raises(InvalidRequestError, match="nesting depth 11"):
        reported(fresh(), nested(10, {"empty": {}}))
    with pytest.raises(InvalidRequestError, match=r"l10\.arr: nesting depth 11"):
        reported(fresh(), nested(10, {"arr": [1]}))  # arrays count as a level
    assert reported(fresh(), nested(9, {"arr": [1]})).reported == nested(9, {"arr": [1]})


def test_depth_is_checked_for_tags_and_desired_too() -> None:
    for body in ({"tags": nested(11, {"p": 1})},
                 {"properties": {"desired": nested(11, {"p": 1})}}):
        with pytest.raises(InvalidRequestError, match="nesting depth 11"):
            patch_desired_and_tags(fresh(), body, now=T0, if_match=None)
        with pytest.raises(InvalidRequestError, match="nesting depth 11"):
            replace_twin(fresh(), body, now=T0, if_match=None)


def test_key_length_limit_exact_boundary_in_utf8_bytes() -> None:
    for ok in ("k" * 1024, "é" * 512):
        validate_patch(Section.REPORTED, {ok: 1})
    for bad in ("k" * 1025, "é" * 512 + "k"):
        with pytest.raises(InvalidRequestError,
                           match="is 1025 bytes of UTF-8, over the limit of 1024"):
            validate_patch(Section.REPORTED, {"outer": {bad: 1}})


@pytest.mark.parametrize("key", ["a.b", "$version", "a b", "tab\t", "nul\x00", "del\x7f",
                                 "c1\x85", "c1\x9f"])
def test_keys_refuse_dot_dollar_space_and_control_characters(key: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"properties\.desired\.o: key .* contains"):
        validate_patch(Section.DESIRED, {"o": {key: 1}})


def test_keys_may_hold_other_characters_but_not_be_empty() -> None:
    validate_patch(Section.TAGS, {"ключ-#_@!": 1, "\xa0nbsp": 2})
    with pytest.raises(InvalidRequestError, match="tags: empty key"):
        validate_patch(Section.TAGS, {"": 1})


def test_string_value_limit_exact_boundary_in_utf8_bytes() -> None:
    for ok in ("x" * 4096, "€" * 1365 + "x"):
        validate_patch(Section.REPORTED, {"s": ok, "list": [ok]})
    for bad in ("x" * 4097, "€" * 1366):
        with pytest.raises(InvalidRequestError,
                           match=r"reported\.s: string is (4097|4098) bytes of UTF-8, over "
                                 r"the limit of 4096"):
            validate_patch(Section.REPORTED, {"s": bad})
    with pytest.raises(InvalidRequestError, match=r"list\[1\]: string is 4097 bytes"):
        validate_patch(Section.REPORTED, {"list": ["ok", "x" * 4097]})


def test_integer_range_exact_boundary() -> None:
    validate_patch(Section.REPORTED, {"max": MAX_INT, "min": MIN_INT, "f": 1e300, "b": True})
    assert (MIN_INT, MAX_INT) == (-(2**52), 2**52 - 1)
    for bad in (MAX_INT + 1, MIN_INT - 1, 2**63):
        with pytest.raises(InvalidRequestError, match=rf"reported\.n: integer {bad} is outside"):
            validate_patch(Section.REPORTED, {"n": bad})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(value: float) -> None:
    with pytest.raises(InvalidRequestError, match="is not finite"):
        validate_patch(Section.REPORTED, {"n": value})


def test_null_inside_an_array_is_refused_and_other_types_too() -> None:
    with pytest.raises(InvalidRequestError, match=r"a\[1\]: null is not allowed inside an array"):
        validate_patch(Section.REPORTED, {"a": [1, None]})
    with pytest.raises(InvalidRequestError, match=r"a\[0\]\.k: null is not allowed"):
        validate_patch(Section.REPORTED, {"a": [{"k": None}]})
    with pytest.raises(InvalidRequestError, match="reported.b: a bytes is not a JSON value"):
        validate_patch(Section.REPORTED, {"b": b"x"})
    with pytest.raises(InvalidRequestError, match="must be a JSON object, not an array"):
        validate_patch(Section.REPORTED, [1])
    with pytest.raises(InvalidRequestError, match="keys must be strings"):
        validate_patch(Section.REPORTED, {1: 1})


def test_a_refused_patch_changes_nothing() -> None:
    twin = reported(fresh(), {"a": 1})
    snapshot = copy.deepcopy(twin)
    with pytest.raises(InvalidRequestError):
        patch_reported(twin, {"b": 2, "bad key": 1}, now=T0)
    with pytest.raises(InvalidRequestError):
        patch_desired_and_tags(twin, {"tags": {"ok": 1}, "properties": {"desired": {"$x": 1}}},
                               now=T0, if_match=None)
    assert twin == snapshot


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.floats() | st.text(max_size=5)
                    | st.booleans(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=10))
def test_any_json_value_is_accepted_or_refused_with_invalid_request(value: Any) -> None:
    try:
        twin, _ = patch_reported(fresh(), {"v": value}, now=T0)
    except InvalidRequestError:
        return
    assert twin.reported == ref_merge({}, {"v": value})


# --- purity -----------------------------------------------------------------------------------

def test_twins_module_imports_no_io() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import gateway.hub.twins\n"
        "banned = {'asyncio', 'socket', 'ssl', 'sqlite3', 'selectors', 'threading', 'time'}\n"
        "print(sorted(banned & (set(sys.modules) - before)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["[]"]


def test_reported_patch_without_notification_is_the_same_twin() -> None:
    """notify=False (nobody wants the twin-change event) skips building its body only."""
    twin = new_twin("d", None, now=T0)
    patch = {"a": {"b": 1, "c": None}, "d": "x"}
    with_body, change = patch_reported(twin, patch, now=T0 + 1)
    without, empty = patch_reported(twin, patch, now=T0 + 1, notify=False)
    assert without == with_body and empty == {} and change["version"] == with_body.version
