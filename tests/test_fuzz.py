"""CI's run of the fuzzer (tests/fuzz.py): a smaller count, a fixed seed, every target. The
full run (10^6 inputs and more) is ``python tests/fuzz.py --count 1000000``."""

from __future__ import annotations

from tests.fuzz import TARGETS, run


def test_fuzz_every_parser_without_a_finding() -> None:
    counts, findings = run(28_000, seed=20261201, targets=list(TARGETS), quiet=True)
    assert not findings, "\n".join(findings)
    assert set(counts) == {"codec", "session", "topic", "username", "sas", "propbag",
                           "c2dsend"}
    assert all(n == 4_000 for n in counts.values())


def test_fuzzer_finds_what_it_should() -> None:
    """The harness reports an exception outside the error tree (so a clean run means something)."""
    import random

    def broken(rng: random.Random, pool: list[bytes]) -> bytes:
        if rng.random() < 0.5:
            raise ValueError("boom")
        return b""

    TARGETS["broken"] = broken
    try:
        _, findings = run(20, seed=1, targets=["broken"], quiet=True)
    finally:
        del TARGETS["broken"]
    assert findings and all("ValueError: boom" in f for f in findings)
