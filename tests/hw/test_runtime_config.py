"""How the bridge runtime follows its twin (hw.runtime, not connected): desired patches merge
into the twin's document, which is applied whole; a gap in ``$version`` asks for a re-read;
reported properties are sent as the merge patch from what the twin holds."""

from __future__ import annotations

from gateway.translation import merge_patch
from hw.runtime import merge_diff
from tests.hw.test_runtime_children import DESIRED, read_twin, runtime


def test_merge_diff_nulls_what_is_gone_and_sends_only_changes() -> None:
    old = {"status": {"buses": {"a": {"state": "up", "n": 1}, "gone": {"state": "down"}},
                      "devices": {"m1": {"x": 1}}}, "config": {"error": "bad", "applied": False}}
    new = {"status": {"buses": {"a": {"state": "up", "n": 2}}, "devices": {"m1": {"x": 1}}},
           "config": {"error": None, "applied": True}}
    patch = merge_diff(old, new)
    assert patch == {"status": {"buses": {"a": {"n": 2}, "gone": None}},
                     "config": {"error": None, "applied": True}}
    assert merge_patch(old, patch) == {"status": {"buses": {"a": {"state": "up", "n": 2}},
                                                  "devices": {"m1": {"x": 1}}},
                                       "config": {"applied": True}}
    assert merge_diff(new, new) == {}
    assert merge_diff({"a": 1}, {"a": 1.5, "b": None}) == {"a": 1.5}
    assert merge_diff({"a": 1}, {"a": True}) == {"a": True}
    assert merge_diff({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}


def test_a_good_patch_after_a_refused_one_applies_the_twins_whole_document() -> None:
    rt, bridge = runtime()
    read_twin(rt, DESIRED)
    rt._desired_patch({"devices": {"m1": {"interval": 2, "bogus": 1}}, "$version": 2})
    assert rt._config_error is not None and bridge.config.devices["m1"].interval == 10
    assert rt.reported()["config"] == {"applied": False, "version": 1, "desiredVersion": 2,
                                       "error": rt._config_error, "children": None}
    rt._desired_patch({"devices": {"m1": {"bogus": None}}, "$version": 3})
    assert rt._config_error is None and bridge.config.devices["m1"].interval == 2
    assert rt.reported()["config"]["applied"] is True
    assert rt.reported()["config"]["version"] == 3


def test_a_lost_patch_asks_for_the_twin_and_an_old_one_is_ignored() -> None:
    rt, bridge = runtime()
    read_twin(rt, DESIRED)
    rt._desired_patch({"devices": {"m1": {"interval": 3}}, "$version": 3})  # 2 was lost
    assert rt._reread.is_set() and bridge.config.devices["m1"].interval == 10
    rt._reread.clear()
    rt._desired_patch({"devices": {"m1": {"interval": 4}}, "$version": 1})  # a stale one
    assert not rt._reread.is_set() and bridge.config.devices["m1"].interval == 10
    rt._desired_patch({"devices": {"m1": {"interval": 5}}, "$version": 2})
    assert bridge.config.devices["m1"].interval == 5 and rt.desired_version == 2
