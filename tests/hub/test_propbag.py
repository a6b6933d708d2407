"""Property bag codec (IoT Hub ref §2.2, §3.1, pitfalls 10-11)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import LocalProtocolError, RemoteProtocolError
from gateway.hub.propbag import decode_bag, decode_component, encode_bag, encode_component

SDK_BAG = "%24.mid=42&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high"

# Text that leans on the characters that matter to the grammar, plus arbitrary unicode.
tricky = st.text(
    alphabet=st.one_of(st.sampled_from("&=%+/$?# ~.-_"), st.characters(codec="utf-8")),
    max_size=20,
)
keys = tricky.filter(bool)
pairs = st.lists(st.tuples(keys, st.one_of(st.none(), tricky)), max_size=8)


def test_decode_sdk_example_gives_system_keys_and_custom_property() -> None:
    assert decode_bag(SDK_BAG) == (
        ("$.mid", "42"),
        ("$.ct", "application/json"),
        ("$.ce", "utf-8"),
        ("alert", "high"),
    )


@pytest.mark.parametrize(
    ("bag", "expected"),
    [
        ("", ()),
        ("?", ()),
        ("&", ()),
        ("a", (("a", None),)),
        ("a=", (("a", ""),)),
        ("a=1&&b=2", (("a", "1"), ("b", "2"))),
        ("?a=1&b", (("a", "1"), ("b", None))),
        ("a=b=c", (("a", "b=c"),)),
        ("a=1+2", (("a", "1+2"),)),
        ("a%2Bb=1%2B2", (("a+b", "1+2"),)),
        ("%24.ct=text%2Fplain%3B%20charset%3Dutf-8", (("$.ct", "text/plain; charset=utf-8"),)),
        ("k=%C3%A9%E2%82%AC", (("k", "é€"),)),
        ("k=é", (("k", "é"),)),
        ("a=1&a=2", (("a", "1"), ("a", "2"))),
        ("$.mid=7", (("$.mid", "7"),)),
    ],
)
def test_decode_follows_the_bag_grammar(bag: str, expected: tuple[object, ...]) -> None:
    assert decode_bag(bag) == expected


def test_decode_keeps_plus_as_plus_never_space() -> None:
    assert decode_bag("a+b=c+d") == (("a+b", "c+d"),)
    assert decode_bag("a+b=c+d%20") == (("a+b", "c+d "),)


@pytest.mark.parametrize(
    "bag",
    ["%", "a=%", "a=%4", "a=%zz", "a=%G1", "%2=1", "a=1%", "k=%FF", "k=%E2%82", "%C3=1", "=v", "=", "a=1&=2"],
)
def test_decode_refuses_malformed_escapes_bad_utf8_and_empty_keys(bag: str) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_bag(bag)


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("$.mid", "%24.mid"),
        ("application/json", "application%2Fjson"),
        ("a b", "a%20b"),
        ("a+b", "a%2Bb"),
        ("k&v=w", "k%26v%3Dw"),
        ("50%", "50%25"),
        ("?#", "%3F%23"),
        ("AZaz09-._~", "AZaz09-._~"),
        ("é", "%C3%A9"),
    ],
)
def test_encode_component_is_full_percent_encoding(text: str, encoded: str) -> None:
    assert encode_component(text) == encoded


def test_encode_bag_writes_bare_keys_for_none_and_accepts_a_mapping() -> None:
    assert encode_bag([("$.mid", "42"), ("flag", None), ("e", "")]) == "%24.mid=42&flag&e="
    assert encode_bag({"$.ct": "application/json", "x": "a b"}) == "%24.ct=application%2Fjson&x=a%20b"
    assert encode_bag([]) == ""


def test_encode_bag_refuses_an_empty_key() -> None:
    with pytest.raises(LocalProtocolError):
        encode_bag([("", "v")])


@given(st.text(max_size=40))
def test_encode_component_matches_quote_with_nothing_safe(text: str) -> None:
    assert encode_component(text) == quote(text, safe="")


@given(pairs)
def test_encode_then_decode_round_trips(items: list[tuple[str, str | None]]) -> None:
    bag = encode_bag(items)
    assert "/" not in bag and "+" not in bag and "#" not in bag and " " not in bag
    assert decode_bag(bag) == tuple(items)
    assert decode_bag("?" + bag) == tuple(items)


@given(tricky)
def test_decode_component_inverts_encode_component(text: str) -> None:
    assert decode_component(encode_component(text)) == text


@given(st.text(alphabet=st.sampled_from("ab=&%2F4G+é?"), max_size=16))
def test_arbitrary_bags_decode_or_raise_remote_protocol_error(bag: str) -> None:
    try:
        result = decode_bag(bag)
    except RemoteProtocolError:
        return
    assert all(key for key, _ in result)


@given(st.text(alphabet=st.sampled_from("ab=&+$.é"), max_size=16))
def test_fast_path_without_percent_splits_on_amp_and_first_equals(bag: str) -> None:
    expected = []
    for segment in bag.split("&"):
        if segment:
            key, sep, value = segment.partition("=")
            expected.append((key, value if sep else None))
    if any(not key for key, _ in expected):
        with pytest.raises(RemoteProtocolError):
            decode_bag(bag)
    else:
        assert decode_bag(bag) == tuple(expected)
