"""Zero-touch: a gateway whose first boot left a group enrollment (ID scope, a key derived from
the group key, provisioning.json) registers itself at its parent's provisioning service, the
parent creates its identity as an edge device, and the upstream link then forwards."""

from __future__ import annotations

import asyncio
import json

from gateway.hub.dps import derive_device_key
from tests.hubproc import create_device
from tests.upstream.federation import CHILD_ADDRESS, PARENT_ADDRESS, child_hub, parent_hub, parent_events, status
from tests.upstream.load import Device, run_device
from tests.waiting import eventually


def test_group_enrollment_registers_the_gateway_then_forwards(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent = parent_hub(tmp_path).start()
    child = None
    try:
        group = json.loads(parent.cli("enrollment", "create", "site-gateways", "--iot-edge").stdout)
        scope = parent.cli("enrollment", "id-scope").stdout.strip()
        key = derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"], "site-7")
        cs = f"HostName={parent.host_name};DeviceId=site-7;SharedAccessKey={key}"
        port = parent.port("mqtt_tls_port")
        child = child_hub(tmp_path, extra_config=(
            f'connection_string = "{cs}"\nca_file = "{parent.ca_file}"\n'
            f'host = "{PARENT_ADDRESS}"\nport = {port}\n'))
        child.data_dir.mkdir(parents=True, exist_ok=True)
        (child.data_dir / "provisioning.json").write_text(json.dumps(
            {"idScope": scope, "registrationId": "site-7"}))
        child.start()

        def registered() -> bool:
            state = json.loads((child.data_dir / "provisioning.json").read_text())
            return bool(state.get("registered"))

        asyncio.run(eventually(registered, 60, "the gateway registered", interval=0.5))
        gw = json.loads(parent.cli("device", "show", "site-7").stdout)
        assert gw["capabilities"]["iotEdge"] is True
        assert gw["authentication"]["symmetricKey"]["primaryKey"] == key
        asyncio.run(eventually(lambda: status(child)["state"] == "connected", 60,
                               "the upstream link connected", interval=0.5, blocking=True))
        sensor = create_device(child, "th-1")["authentication"]["symmetricKey"]["primaryKey"]
        asyncio.run(asyncio.wait_for(run_device(
            Device("th-1", sensor), child.host_name, CHILD_ADDRESS,
            lambda: child.port("mqtt_local_port"), asyncio.Event(), count=3), 60))

        def arrived() -> bool:
            return sum(e["origin"] == "th-1" for e in parent_events(parent, 1.0)) == 3

        asyncio.run(eventually(arrived, 60, "telemetry at the parent", interval=0.5,
                               blocking=True))
    finally:
        if child is not None:
            child.stop()
        parent.stop()
