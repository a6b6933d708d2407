#!/usr/bin/env python3
"""A seeded mutation fuzzer for the hub's parsers: every input a client controls.
(Text inputs are what a UTF-8 decode can give: MQTT strings are decoded strictly by the codec,
so lone surrogates never reach the text parsers; the codec target covers bad UTF-8.)

Targets (issue 8, "How it is checked"): the MQTT codec (``Decoder.feed`` over random splits),
the server session machine (a CONNECT, then mutated packets, accepted and acknowledged as the
broker does), PUBLISH topics and SUBSCRIBE filters (``gateway.hub.addresses``, and the MQTT
topic rules), CONNECT usernames, SAS tokens (parse, then check), property bags (decode,
plus the round trip ``decode(encode(pairs)) == pairs`` for any pairs), and, from the service
side, a C2D send's properties as JSON gives them.

Each input is a valid seed (built from random fields) put through 1-4 mutations (bit flips,
byte/char insertions and deletions, splices, extreme lengths, truncation). An input may be
refused only with the project's own error tree (:class:`gateway.errors.GatewayError`); any
other exception, a broken round trip or a session left open after a protocol error is a
finding, printed with the seed and the input (hex) to replay it::

    python tests/fuzz.py --count 1000000            # about a minute per 10^6 on one core
    python tests/fuzz.py --count 2000 --seed 7 --target sas

Exit status 1 if anything was found.
"""

from __future__ import annotations

import argparse
import base64
import random
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.errors import GatewayError  # noqa: E402
from gateway.hub.addresses import parse_publish_topic, parse_subscribe_filter  # noqa: E402
from gateway.hub.c2dsend import parse_send  # noqa: E402
from gateway.hub.propbag import decode_bag, encode_bag  # noqa: E402
from gateway.hub.sas import generate_sas_token, parse_sas_token, verify_sas_signature  # noqa: E402
from gateway.hub.username import parse_username  # noqa: E402
from gateway.mqtt.codec import Decoder, encode  # noqa: E402
from gateway.mqtt.packets import (  # noqa: E402
    Connect,
    Disconnect,
    Pingreq,
    Puback,
    Publish,
    Subscribe,
    Unsubscribe,
    Will,
)
from gateway.mqtt.session import (  # noqa: E402
    ConnectReceived,
    PublishReceived,
    ServerSession,
    SessionState,
)
from gateway.mqtt.topics import filter_problem, topic_problem  # noqa: E402

MAX_PACKET = 300 * 1024
KEY = base64.b64encode(b"k" * 32).decode()
HOST = "hub.local"
TEXT = string.ascii_letters + string.digits + "/?&=%$.#+-_ ~*'()!:;@,\\\"\x00\x7f\u00e9\u4e2d\U0001f600"
SPECIAL = ["%", "%2", "%zz", "%C3", "%ff", "&", "=", "?", "/", "#", "+", "$", "\x00",
           "%00", "&&", "==", "//", "api-version=", "$.mid=", "$.ct=", "SharedAccessSignature ",
           "se=", "sr=", "sig=", "skn=", "9" * 400, "-1", " "]


class Finding(Exception):
    pass


# -- seeds ------------------------------------------------------------------------------------

def _word(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "-._") for _ in range(rng.randint(1, n)))


def seed_topic(rng: random.Random, device: str, module: str | None, *, filters: bool = True) -> str:
    base = f"devices/{device}" + (f"/modules/{module}" if module else "")
    kind = rng.randrange(6 if filters else 5)
    if kind == 0:
        pairs = [(_word(rng), _word(rng)) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.5:
            pairs.append(("$.mid", _word(rng)))
        return f"{base}/messages/events/" + encode_bag(pairs)
    if kind == 1:
        return f"$iothub/twin/GET/?$rid={rng.randint(0, 10**6)}"
    if kind == 2:
        return f"$iothub/twin/PATCH/properties/reported/?$rid={rng.randint(0, 99)}&$version={rng.randint(0, 9)}"
    if kind == 3:
        return f"$iothub/methods/res/{rng.choice([200, 404, 500])}/?$rid={_word(rng)}"
    if kind == 4:
        return f"{base}/messages/events/{_word(rng)}%3D{_word(rng)}&a"
    return rng.choice(["$iothub/twin/res/#", f"{base}/messages/devicebound/#",
                       "$iothub/methods/POST/#", f"{base}/inputs/#", "#", "+/+"])


def seed_username(rng: random.Random) -> str:
    device = _word(rng)
    module = f"/{_word(rng)}" if rng.random() < 0.3 else ""
    extra = rng.choice(["", "&DeviceClientType=py-azure-iot-device%2F2.14", "&model-id=dtmi%3Ax%3By%3B1"])
    return f"{HOST}/{device}{module}/?api-version=2021-04-12{extra}"


def seed_sas(rng: random.Random) -> str:
    resource = f"{HOST}/devices/{_word(rng)}"
    policy = rng.choice([None, "iothubowner", "device"])
    return generate_sas_token(resource, KEY, rng.randint(0, 2**33), policy)


def seed_bag(rng: random.Random) -> str:
    pairs = [(_word(rng) if rng.random() < 0.8 else rng.choice(SPECIAL) + "x",
              None if rng.random() < 0.2 else "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 6))))
             for _ in range(rng.randint(0, 5))]
    return encode_bag(pairs)


def seed_packet(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return encode(Publish(topic=seed_topic(rng, "d", None, filters=False),
                              payload=rng.randbytes(rng.randint(0, 64)),
                              qos=1, packet_id=rng.randint(1, 65535), retain=rng.random() < 0.1))
    if kind == 1:
        return encode(Publish(topic=seed_topic(rng, "d", None, filters=False),
                              payload=rng.randbytes(rng.randint(0, 16))))
    if kind == 2:
        return encode(Subscribe(rng.randint(1, 65535), ((seed_topic(rng, "d", None), rng.randint(0, 1)),)))
    if kind == 3:
        return encode(Unsubscribe(rng.randint(1, 65535), (seed_topic(rng, "d", None),)))
    if kind == 4:
        return encode(Puback(rng.randint(1, 65535)))
    if kind == 5:
        return encode(Pingreq())
    return encode(Disconnect())


def seed_connect(rng: random.Random) -> bytes:
    will = Will(topic="devices/d/messages/events/", payload=b"bye", qos=1, retain=False) \
        if rng.random() < 0.2 else None
    return encode(Connect(client_id="d", clean_session=rng.random() < 0.5,
                          keepalive=rng.randint(0, 65535), username=seed_username(rng),
                          password=seed_sas(rng).encode(), will=will))


# -- mutations --------------------------------------------------------------------------------

def mutate_bytes(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        pos = rng.randint(0, len(b)) if b else 0
        if op == 0 and b:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # set a byte to an extreme
            b[rng.randrange(len(b))] = rng.choice([0, 0x7F, 0x80, 0xFF, 0x30, 0x32, 0xC0, 0xE0])
        elif op == 2:
            b[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and b:
            del b[pos:pos + rng.randint(1, 8)]
        elif op == 4:
            b = b[:pos]  # truncate
        elif op == 5 and pool:  # splice in part of another seed
            other = rng.choice(pool)
            i = rng.randint(0, len(other))
            b[pos:pos] = other[i:i + rng.randint(1, 32)]
        elif op == 6:  # a remaining length that lies
            b[pos:pos] = rng.choice([b"\xff\xff\xff\x7f", b"\xff\xff\xff\xff\x01", b"\x80\x00", b"\x00"])
        elif op == 7 and len(b) > 2:  # 16-bit length fields
            i = rng.randrange(len(b) - 1)
            b[i:i + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x00\x01", b"\x80\x00"])
        elif op == 8:
            b += rng.choice(pool) if pool else b""
    return bytes(b)


def mutate_text(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(chars))
        if op == 0 and chars:
            chars[rng.randrange(len(chars))] = rng.choice(TEXT)
        elif op == 1:
            chars[pos:pos] = list(rng.choice(SPECIAL))
        elif op == 2 and chars:
            del chars[pos:pos + rng.randint(1, 6)]
        elif op == 3:
            chars = chars[:pos]
        elif op == 4:
            chars[pos:pos] = [rng.choice(TEXT) for _ in range(rng.randint(1, 6))]
        elif op == 5:
            chars = chars + chars[: rng.randint(0, len(chars))]
    return "".join(chars)


# -- targets ----------------------------------------------------------------------------------

def t_codec(rng: random.Random, pool: list[bytes]) -> bytes:
    stream = b"".join(rng.choice(pool) for _ in range(rng.randint(1, 4)))
    data = mutate_bytes(rng, stream, pool)
    decoder = Decoder(MAX_PACKET)
    pos = 0
    try:
        while pos < len(data):  # random splits: the decoder must not depend on them
            step = rng.randint(1, max(1, len(data) - pos))
            decoder.feed(data[pos:pos + step])
            pos += step
    except GatewayError:
        pass
    if rng.random() < 0.05:  # the unmutated stream decodes to what was encoded
        packets = Decoder(MAX_PACKET).feed(stream)
        if b"".join(encode(p) for p in packets) != stream:
            raise Finding("codec round trip changed the bytes")
    return data


def t_session(rng: random.Random, pool: list[bytes]) -> bytes:
    data = seed_connect(rng) if rng.random() < 0.9 else b""
    data += b"".join(rng.choice(pool) for _ in range(rng.randint(0, 5)))
    data = mutate_bytes(rng, data, pool) if rng.random() < 0.9 else data
    session = ServerSession(max_packet_size=MAX_PACKET, max_inflight=10, connect_timeout=60.0, now=0.0)
    pos, now = 0, 0.0
    try:
        while pos < len(data):
            step = rng.randint(1, max(1, len(data) - pos))
            now += rng.random()
            for event in session.receive(data[pos:pos + step], now):
                if type(event) is ConnectReceived:
                    session.accept(rng.random() < 0.5)
                elif type(event) is PublishReceived and event.packet.qos == 1:
                    session.ack_many([event.packet.packet_id])  # type: ignore[list-item]
            pos += step
            if session.state is SessionState.CONNECTED and rng.random() < 0.2:
                session.publish("devices/d/messages/devicebound/", b"x", 1)
            session.data_to_send()
            session.deadline()
    except GatewayError:
        if session.state is not SessionState.CLOSED:
            raise Finding(f"session left {session.state} after a protocol error") from None
    return data


def t_topic(rng: random.Random, pool: list[bytes]) -> bytes:
    device = rng.choice(["d", "dev-1", "a.b"])
    module = rng.choice([None, None, "m1"])
    text = mutate_text(rng, seed_topic(rng, device, module))
    topic_problem(text)
    filter_problem(text)
    for parse in (parse_publish_topic, parse_subscribe_filter):
        try:
            parse(text, device_id=device, module_id=module)
        except GatewayError:
            pass
    return text.encode("utf-8", "surrogatepass")


def t_username(rng: random.Random, pool: list[bytes]) -> bytes:
    text = mutate_text(rng, seed_username(rng))
    try:
        parse_username(text)
    except GatewayError:
        pass
    return text.encode("utf-8", "surrogatepass")


def t_sas(rng: random.Random, pool: list[bytes]) -> bytes:
    text = mutate_text(rng, seed_sas(rng))
    try:
        token = parse_sas_token(text)
        verify_sas_signature(token, [KEY], now=1.7e9)
    except GatewayError:
        pass
    return text.encode("utf-8", "surrogatepass")


def t_propbag(rng: random.Random, pool: list[bytes]) -> bytes:
    text = mutate_text(rng, seed_bag(rng))
    try:
        decode_bag(text)
    except GatewayError:
        pass
    pairs = tuple((rng.choice(SPECIAL) + _word(rng), None if rng.random() < 0.2 else
                   "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 8))))
                  for _ in range(rng.randint(0, 4)))
    if decode_bag(encode_bag(pairs)) != pairs:
        raise Finding(f"bag round trip changed {pairs!r}")
    return text.encode("utf-8", "surrogatepass")


def t_c2dsend(rng: random.Random, pool: list[bytes]) -> bytes:
    """A C2D send's properties as the service API's JSON gives them: any JSON value, and
    strings with lone surrogates (JSON's "\\ud800" escape) too."""
    names = ["messageId", "correlationId", "userId", "contentType", "contentEncoding", "ack",
             "iothub-ack", "expiryTimeUtc", "to", "$.mid", "color", _word(rng)]
    texts = ["positive", "full", "none", "2030-01-01T00:00:00Z", "1999-01-01", "\ud800",
             "a\udfffb", "\u00e9", "x" * 200, _word(rng)]
    props: dict[str, object] = {}
    for _ in range(rng.randint(0, 5)):
        key = mutate_text(rng, rng.choice(names)) if rng.random() < 0.3 else rng.choice(names)
        if rng.random() < 0.05:
            key += "\ud800"
        props[key] = rng.choice([None, 5, 1.5, True, [], {}, mutate_text(rng, rng.choice(texts)),
                                 rng.choice(texts)])
    try:
        parse_send("d", rng.randbytes(rng.randint(0, 64)), props, now=1.7e9, default_ttl=3600,
                   max_ttl=172800, max_bytes=65536)
    except GatewayError:
        pass
    return repr(props).encode("utf-8", "backslashreplace")


TARGETS: dict[str, Callable[[random.Random, list[bytes]], bytes]] = {
    "codec": t_codec, "session": t_session, "topic": t_topic, "username": t_username,
    "sas": t_sas, "propbag": t_propbag, "c2dsend": t_c2dsend,
}


def run(count: int, seed: int, targets: list[str], *, quiet: bool = False,
        max_findings: int = 20) -> tuple[dict[str, int], list[str]]:
    """Fuzz ``count`` inputs spread over ``targets``; returns inputs per target and findings."""
    rng = random.Random(seed)
    pool = [seed_packet(rng) for _ in range(256)] + [seed_connect(rng) for _ in range(32)]
    counts = dict.fromkeys(targets, 0)
    findings: list[str] = []
    for i in range(count):
        name = targets[i % len(targets)]
        case_seed = rng.getrandbits(64)
        case = random.Random(case_seed)
        try:
            TARGETS[name](case, pool)
        except Exception as exc:  # a finding: anything outside the error tree
            replay = TARGETS[name].__name__
            findings.append(f"{name} seed={seed} case={case_seed} ({replay}): "
                            f"{type(exc).__name__}: {exc}"[:500])
            if len(findings) >= max_findings:
                break
        counts[name] += 1
        if not quiet and (i + 1) % 100_000 == 0:
            print(f"{i + 1} inputs, {len(findings)} findings", file=sys.stderr, flush=True)
    return counts, findings


def replay(target: str, case_seed: int, seed: int) -> None:
    """Re-run one case with its traceback (the pool is rebuilt from ``seed``)."""
    rng = random.Random(seed)
    pool = [seed_packet(rng) for _ in range(256)] + [seed_connect(rng) for _ in range(32)]
    TARGETS[target](random.Random(case_seed), pool)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000, help="inputs in all (default 100000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--target", action="append", choices=sorted(TARGETS),
                    help="fuzz only these (repeatable; default all)")
    ap.add_argument("--replay", type=int, metavar="CASE", help="re-run one case of --target")
    args = ap.parse_args()
    targets = args.target or list(TARGETS)
    if args.replay is not None:
        replay(targets[0], args.replay, args.seed)
        print("no finding")
        return 0
    started = time.monotonic()
    counts, findings = run(args.count, args.seed, targets)
    took = time.monotonic() - started
    total = sum(counts.values())
    per = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"{total} inputs in {took:.1f} s ({total / took:,.0f}/s), seed {args.seed}: {per}")
    for line in findings:
        print("FINDING", line)
    print(f"{len(findings)} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
