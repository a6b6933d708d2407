"""The merge patch between two desired documents (gateway.upstream.modulepush), pure."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.upstream.modulepush import apply_patch, merge_patch

CASES: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ({}, {}, {}),
    ({"a": 1}, {"a": 1}, {}),
    ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
    ({"buses": {"plc": {"tcp": {"port": 502}}, "spare": {}}},
     {"buses": {"plc": {"tcp": {"port": 503}}}},
     {"buses": {"plc": {"tcp": {"port": 503}}, "spare": None}}),
    ({"a": {"x": 1}}, {"a": 5}, {"a": 5}),
    ({"a": 5}, {"a": {"x": 1}}, {"a": {"x": 1}}),
    ({"l": [1, 2]}, {"l": [2]}, {"l": [2]}),
]


@pytest.mark.parametrize(("current", "wanted", "patch"), CASES)
def test_merge_patch_turns_current_into_wanted(current: dict[str, Any], wanted: dict[str, Any],
                                               patch: dict[str, Any]) -> None:
    before = copy.deepcopy(current)
    assert merge_patch(current, wanted) == patch
    assert apply_patch(current, patch) == wanted
    assert current == before  # not changed in place
