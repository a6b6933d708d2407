"""The CLI's twin, method and c2d commands, and the served OpenAPI document."""

from __future__ import annotations

import json

from openapi_spec_validator import validate

from gateway.hubclient import HubClient
from tests.hubproc import HubProcess, create_device


def test_openapi_lists_every_route(hub: HubProcess) -> None:
    doc = HubClient(hub.data_dir).request("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.")
    for path, method in [("/devices/{device_id}", "put"), ("/twins/{device_id}", "patch"),
                         ("/twins/{device_id}/methods", "post"),
                         ("/devices/{device_id}/messages/deviceBound", "post"),
                         ("/messages/events", "get"), ("/routing/routes/{name}", "put"),
                         ("/routing/endpoints/{name}", "put"), ("/routing/health", "get"),
                         ("/routing/enrichments/{key}", "put"), ("/routing/test", "post")]:
        op = doc["paths"][path][method]
        assert op["summary"] and "right" in op["description"]
    route = doc["paths"]["/routing/routes/{name}"]["put"]["requestBody"]["content"]
    assert route["application/json"]["schema"] == {"$ref": "#/components/schemas/Route"}
    assert {"priority", "timeToLiveSecs", "liveFirst"} <= set(
        doc["components"]["schemas"]["Route"]["properties"])
    validate(doc)  # raises on any schema violation


def test_cli_twin_update_show_and_errors(hub: HubProcess) -> None:
    create_device(hub, "dev1")
    out = hub.cli("twin", "update", "dev1", "--desired", '{"interval": 30}', "--tags", '{"site": "a"}')
    assert json.loads(out.stdout)["properties"]["desired"]["interval"] == 30
    twin = json.loads(hub.cli("twin", "show", "dev1").stdout)
    assert twin["tags"] == {"site": "a"} and twin["properties"]["desired"]["$version"] == 2
    bad = hub.cli("twin", "update", "dev1", "--desired", "{oops", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("gateway: error: --desired is not valid JSON")
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = hub.cli("twin", "show", "ghost", check=False)
    assert missing.returncode == 1 and "404" in missing.stderr


def test_cli_method_to_offline_device_fails_cleanly(hub: HubProcess) -> None:
    create_device(hub, "dev1")
    result = hub.cli("method", "invoke", "dev1", "reboot", "--payload", '{"a": 1}', check=False)
    assert result.returncode == 1 and "404" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_c2d_send_purge(hub: HubProcess) -> None:
    create_device(hub, "dev1")
    sent = json.loads(hub.cli("c2d", "send", "dev1", "--body", "hi", "--prop", "a=b").stdout)
    assert sent["pending"] == 1 and sent["messageId"]
    assert json.loads(hub.cli("c2d", "purge", "dev1").stdout)["totalMessagesPurged"] == 1
    bad = hub.cli("c2d", "send", "dev1", "--prop", "novalue", check=False)
    assert bad.returncode == 1 and "KEY=VALUE" in bad.stderr
