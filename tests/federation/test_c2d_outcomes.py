"""Cloud-to-device outcomes through two gateways, whatever protocol the device uses at its leaf:
a device taking its messages through the leaf's **HTTP** device API rejects one, abandons and
then completes another, and abandons a third until it is dead-lettered; each outcome travels up
at once (well inside the top's 60 s lock period) and the top writes the feedback with the
status the message left with (Rejected, Success, DeliveryCountExceeded). Expiry and the
50-message limit are the top's and hold across the hierarchy."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.hubclient import ApiError, HubClient
from tests.federation.hierarchy import LEAF, Hierarchy, leaf_device, show, wait
from tests.hubproc import HubProcess, device_token


def _pending(hub: HubProcess, device_id: str) -> int:
    device = show(hub, device_id)
    assert device is not None
    return int(device["cloudToDeviceMessageCount"])


class HttpDevice:
    """The device side of C2D over the leaf's HTTPS device API (IoT Hub ref §3.2)."""

    def __init__(self, hub: HubProcess, device_id: str, key: str) -> None:
        self.hub, self.device_id, self.key = hub, device_id, key
        self.base = (f"https://{LEAF}:{hub.port('api_port')}/devices/{device_id}"
                     "/messages/deviceBound")
        self.ctx = ssl.create_default_context(cafile=hub.ca_file)

    def _call(self, method: str, url: str) -> tuple[int, Any, bytes]:
        request = urllib.request.Request(url + ("&" if "?" in url else "?")
                                         + "api-version=2020-09-30", method=method, headers={
            "Authorization": device_token(self.hub, self.device_id, self.key)})
        try:
            with urllib.request.urlopen(request, context=self.ctx, timeout=10) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def receive(self) -> tuple[str, bytes] | None:
        """(lock token, body) of the next message, or None (204)."""
        status, headers, body = self._call("GET", self.base)
        if status == 204:
            return None
        assert status == 200, (status, body)
        return headers["ETag"].strip('"'), body

    def settle(self, token: str, action: str) -> None:
        if action == "abandon":
            status, _, body = self._call("POST", f"{self.base}/{token}/abandon")
        else:
            status, _, body = self._call(
                "DELETE", f"{self.base}/{token}" + ("?reject" if action == "reject" else ""))
        assert status == 204, (action, status, body)


def _feedback(h: Hierarchy, count: int, timeout: float = 15) -> dict[str, str]:
    """message id -> feedback status at the top, once ``count`` records are there."""
    seen: dict[str, str] = {}

    def more() -> bool:
        out = h.top.cli("c2d", "feedback", "--wait", "2").stdout
        for line in out.splitlines():
            if line.strip():
                record = json.loads(line)
                seen[record["originalMessageId"]] = record["statusCode"]
        return len(seen) >= count

    wait(more, timeout, f"{count} feedback records at the top ({seen})")
    return seen


def _send(h: Hierarchy, device_id: str, message_id: str, body: str,
          **properties: Any) -> None:
    HubClient(h.top.data_dir).request(
        "POST", f"/devices/{device_id}/messages/deviceBound",
        {"body": body, "properties": {"messageId": message_id, "ack": "full", **properties}})


def test_http_outcomes_travel_up(hierarchy: Hierarchy) -> None:
    h = hierarchy
    created = leaf_device(h, "dev7")
    device = HttpDevice(h.leaf, "dev7", created["authentication"]["symmetricKey"]["primaryKey"])
    # reject: gone at the top at once, feedback Rejected
    _send(h, "dev7", "r-1", "no")
    wait(lambda: _pending(h.leaf, "dev7") == 1, 10, "r-1 in the leaf's queue")
    got = device.receive()
    assert got is not None and got[1] == b"no"
    started = time.monotonic()
    device.settle(got[0], "reject")
    wait(lambda: _pending(h.top, "dev7") == 0, 10, "r-1 rejected at the top")
    assert time.monotonic() - started < 10  # not after the top's 60 s lock period
    assert _feedback(h, 1) == {"r-1": "Rejected"}
    # abandon, then complete: still the top's after the abandon; Success at the end
    _send(h, "dev7", "a-1", "later")
    wait(lambda: _pending(h.leaf, "dev7") == 1, 10, "a-1 in the leaf's queue")
    got = device.receive()
    assert got is not None and got[1] == b"later"
    device.settle(got[0], "abandon")
    time.sleep(1.0)  # the abandon went up: the top keeps the message
    assert _pending(h.top, "dev7") == 1 and _pending(h.leaf, "dev7") == 1
    again = device.receive()  # delivered again at the leaf (the top's resend is dropped there)
    assert again is not None and again[1] == b"later" and again[0] != got[0]
    device.settle(again[0], "complete")
    wait(lambda: _pending(h.top, "dev7") == 0, 10, "a-1 completed at the top")
    assert device.receive() is None  # once: no copy of the top's resends was queued again
    assert _feedback(h, 1) == {"a-1": "Success"}
    # abandoned max_delivery_count (10) times: dead-lettered, DeliveryCountExceeded at the top
    _send(h, "dev7", "x-1", "never")
    wait(lambda: _pending(h.leaf, "dev7") == 1, 10, "x-1 in the leaf's queue")
    for _ in range(10):
        got = device.receive()
        assert got is not None and got[1] == b"never"
        device.settle(got[0], "abandon")
    assert device.receive() is None
    wait(lambda: _pending(h.top, "dev7") == 0, 10, "x-1 dead-lettered at the top")
    assert _feedback(h, 1) == {"x-1": "DeliveryCountExceeded"}


def test_expiry_and_the_queue_limit_hold_across_the_hierarchy(hierarchy: Hierarchy) -> None:
    h = hierarchy
    leaf_device(h, "dev8")
    expiry = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    _send(h, "dev8", "e-1", "late", expiryTimeUtc=expiry)
    wait(lambda: _pending(h.leaf, "dev8") == 1, 10, "e-1 in the leaf's queue")
    wait(lambda: _pending(h.top, "dev8") == 0 and _pending(h.leaf, "dev8") == 0, 15,
         "e-1 expired at both ends")
    assert _feedback(h, 1) == {"e-1": "Expired"}
    for i in range(50):  # the device is offline: the top holds 50 (and the leaf its copies)
        _send(h, "dev8", f"q-{i}", str(i))
    try:
        _send(h, "dev8", "q-50", "50")
        raise AssertionError("the 51st message was accepted")
    except ApiError as exc:
        assert exc.status == 403 and "at most 50" in str(exc), exc
    wait(lambda: _pending(h.leaf, "dev8") == 50, 20, "the 50 in the leaf's queue")
    assert _pending(h.top, "dev8") == 50
