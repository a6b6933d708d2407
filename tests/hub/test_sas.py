"""SAS tokens (IoT Hub ref §7.1), checked against tokens built the way each Azure SDK builds them."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import AuthError
from gateway.hub.sas import (
    MAX_EXPIRY,
    generate_sas_token,
    parse_sas_token,
    verify_sas_signature,
)

KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(1, 33))).decode()
NOW = 1_700_000_000


def _signature(key_b64: str, message: str) -> str:
    digest = hmac.new(base64.b64decode(key_b64), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def device_sdk_token(uri: str, key: str, expiry: int) -> str:
    """As azure-iot-device's RenewableSasToken._build_token does it."""
    sr = quote(uri, safe="")
    sig = quote(_signature(key, f"{sr}\n{expiry}"), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"


def service_sdk_token(uri: str, key: str, expiry: int, policy: str) -> str:
    """As azure-iot-hub's SasToken._build_token does it: quote_plus(uri), sig with quote()."""
    sr = quote_plus(uri)
    sig = quote(_signature(key, f"{sr}\n{expiry}"))
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={policy}"


def test_generate_matches_the_device_sdk_byte_for_byte() -> None:
    uri = "myhub.azure-devices.net/devices/dev+1#?$"
    assert generate_sas_token(uri, KEY, NOW + 3600) == device_sdk_token(uri, KEY, NOW + 3600)


def test_generate_appends_skn_for_policy_keys() -> None:
    token = generate_sas_token("hub", KEY, NOW, policy="iothubowner")
    assert token.endswith("&skn=iothubowner")
    assert parse_sas_token(token).policy == "iothubowner"


def test_device_sdk_token_verifies_and_keeps_upper_case_escapes() -> None:
    token = parse_sas_token(device_sdk_token("Hub.Example/devices/Dev%1", KEY, NOW + 60))
    assert token.raw_sr == "Hub.Example%2Fdevices%2FDev%251"
    assert token.resource == "Hub.Example/devices/Dev%1"
    assert token.expiry == NOW + 60 and token.raw_se == str(NOW + 60)
    assert token.policy is None
    verify_sas_signature(token, [KEY], now=NOW)


def test_service_sdk_token_with_slash_in_sig_verifies() -> None:
    # Find an expiry whose signature contains "/", which quote() leaves unescaped.
    expiry = next(e for e in range(NOW, NOW + 1000)
                  if "/" in _signature(KEY, f"{quote_plus('hub.local')}\n{e}"))
    raw = service_sdk_token("hub.local", KEY, expiry, "service")
    assert "/" in raw.split("sig=")[1].split("&")[0]
    token = parse_sas_token(raw)
    assert token.resource == "hub.local" and token.policy == "service"
    verify_sas_signature(token, [KEY], now=NOW)


def test_lower_case_escapes_are_verified_over_the_raw_sr() -> None:
    sr = "hub%2fdevices%2fdev1"
    se = str(NOW + 10)
    sig = quote(_signature(KEY, f"{sr}\n{se}"), safe="")
    token = parse_sas_token(f"SharedAccessSignature sr={sr}&sig={sig}&se={se}")
    assert token.resource == "hub/devices/dev1"
    verify_sas_signature(token, [KEY], now=NOW)


def test_re_escaping_the_sr_breaks_the_signature() -> None:
    raw = device_sdk_token("hub/devices/dev1", KEY, NOW + 10)
    tampered = parse_sas_token(raw.replace("%2F", "%2f"))
    with pytest.raises(AuthError, match="bad signature"):
        verify_sas_signature(tampered, [KEY], now=NOW)


def test_unencoded_signature_with_plus_is_accepted() -> None:
    expiry = next(e for e in range(NOW, NOW + 1000)
                  if "+" in _signature(KEY, f"hub%2Fdevices%2Fd\n{e}"))
    sig = _signature(KEY, f"hub%2Fdevices%2Fd\n{expiry}")
    token = parse_sas_token(f"SharedAccessSignature sr=hub%2Fdevices%2Fd&sig={sig}&se={expiry}")
    verify_sas_signature(token, [KEY], now=NOW)


def test_field_names_are_case_insensitive_and_order_free() -> None:
    raw = device_sdk_token("hub/devices/d", KEY, NOW + 10)
    fields = raw.split(" ", 1)[1].split("&")
    shuffled = "&".join(f.replace("sr=", "SR=").replace("se=", "Se=") for f in reversed(fields))
    verify_sas_signature(parse_sas_token(f"SharedAccessSignature {shuffled}"), [KEY], now=NOW)


def test_secondary_key_verifies_and_unusable_keys_are_skipped() -> None:
    token = parse_sas_token(generate_sas_token("hub/devices/d", OTHER_KEY, NOW + 10))
    verify_sas_signature(token, ["not base64!", KEY, OTHER_KEY], now=NOW)


def test_wrong_key_is_a_bad_signature_with_connack_5() -> None:
    token = parse_sas_token(generate_sas_token("hub/devices/d", KEY, NOW + 10))
    with pytest.raises(AuthError, match="bad signature") as info:
        verify_sas_signature(token, [OTHER_KEY], now=NOW)
    assert info.value.connack == 5
    with pytest.raises(AuthError, match="bad signature"):
        verify_sas_signature(token, [], now=NOW)


@pytest.mark.parametrize(("now", "ok"), [
    (NOW, True),                # not yet expired
    (NOW + 300, True),          # expired 300 s ago: inside the 5-minute skew
    (NOW + 300.5, False),       # just outside the skew
    (NOW + 86400, False),
])
def test_expiry_allows_five_minutes_of_skew(now: float, ok: bool) -> None:
    token = parse_sas_token(generate_sas_token("hub/devices/d", KEY, NOW))
    if ok:
        verify_sas_signature(token, [KEY], now=now)
    else:
        with pytest.raises(AuthError, match="token expired"):
            verify_sas_signature(token, [KEY], now=now)


def test_custom_skew() -> None:
    token = parse_sas_token(generate_sas_token("hub/devices/d", KEY, NOW))
    with pytest.raises(AuthError, match="token expired"):
        verify_sas_signature(token, [KEY], now=NOW + 1, skew=0)


GOOD_SIG = quote(base64.b64encode(bytes(32)).decode(), safe="")


@pytest.mark.parametrize("raw", [
    "",
    "SharedAccessSignature",
    f"Bearer sr=hub&sig={GOOD_SIG}&se=1",
    f"sharedaccesssignature sr=hub&sig={GOOD_SIG}&se=1",
    f"SharedAccessSignature sig={GOOD_SIG}&se=1",
    "SharedAccessSignature sr=hub&se=1",
    f"SharedAccessSignature sr=hub&sig={GOOD_SIG}",
    f"SharedAccessSignature sr=&sig={GOOD_SIG}&se=1",
    f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=soon",
    f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=-5",
    f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1.5",
    f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1&se=2",
    f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1&foo=bar",
    f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1&skn",
    "SharedAccessSignature sr=hub&sig=@@@@&se=1",
    "SharedAccessSignature sr=hub&sig=AAAA&se=1",
    f"SharedAccessSignature sr=hub&sig={GOOD_SIG}&se=1" + "&x" * 3000,
])
def test_malformed_tokens_raise_auth_error_with_connack_4(raw: str) -> None:
    with pytest.raises(AuthError) as info:
        parse_sas_token(raw)
    assert info.value.connack == 4


@given(
    resource=st.text(min_size=1, max_size=80),
    key=st.binary(min_size=16, max_size=64).map(lambda b: base64.b64encode(b).decode()),
    expiry=st.integers(min_value=0, max_value=MAX_EXPIRY),  # any second up to 9999-12-31
    policy=st.none() | st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", min_size=1),
)
def test_generated_tokens_round_trip(resource: str, key: str, expiry: int,
                                     policy: str | None) -> None:
    token = parse_sas_token(generate_sas_token(resource, key, expiry, policy))
    assert token.resource == resource
    assert token.expiry == expiry
    assert token.policy == policy
    verify_sas_signature(token, [key], now=expiry)


@given(st.text(max_size=300))
def test_arbitrary_text_parses_or_raises_auth_error(raw: str) -> None:
    try:
        parse_sas_token(raw)
    except AuthError as exc:
        assert exc.connack == 4


@pytest.mark.parametrize("digits", [13, 20, 400, 1000])
def test_an_expiry_past_year_9999_is_refused_not_an_overflow(digits: int) -> None:
    expiry = int("9" * digits)
    token = parse_sas_token(generate_sas_token("hub/devices/d", KEY, expiry))
    with pytest.raises(AuthError, match="token expiry out of range") as err:
        verify_sas_signature(token, [KEY], now=NOW)
    assert err.value.connack == 5
    verify_sas_signature(parse_sas_token(generate_sas_token("hub/devices/d", KEY, MAX_EXPIRY)),
                         [KEY], now=NOW)
