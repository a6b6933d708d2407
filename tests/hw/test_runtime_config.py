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


async def test_a_configuration_change_is_reported_at_once_and_again_a_second_later() -> None:
    """With a 30 s status interval, a change is reported at once and followed up after
    FOLLOW_UP_S (a bus it added has connected by then), then the interval applies again."""
    import asyncio
    import time

    from hw import runtime as rt_module

    rt, _ = runtime()
    rt.status_interval = 30.0
    times: list[float] = []

    async def report(client: object) -> None:
        times.append(time.monotonic())

    rt._report = report  # type: ignore[method-assign]
    loop = asyncio.create_task(rt._status_loop(None))  # type: ignore[arg-type]
    try:
        start = time.monotonic()
        rt._report_now.set()
        await asyncio.sleep(rt_module.FOLLOW_UP_S + 1.0)
    finally:
        loop.cancel()
    assert len(times) == 2, times
    assert times[0] - start < 0.5
    assert rt_module.FOLLOW_UP_S - 0.1 <= times[1] - times[0] < rt_module.FOLLOW_UP_S + 0.9
