"""The ``http`` endpoint: POST the JSON envelope through aiohttp.

``batch = 1`` posts one envelope object per request; ``batch = N > 1`` posts a JSON array of
up to N envelopes (in log order). The answer decides:

- 2xx: delivered (the cursor moves over the request's messages);
- 408, 429 and 5xx, a refused connection, a timeout: retry later, the same messages in the
  same order (so per-device order holds); a 3xx too (redirects are not followed: the
  messages and credentials go only where the endpoint says);
- 401, 403 and 407 also retry later: they say the endpoint's credentials are wrong, not the
  messages, so dead-lettering would throw away everything until someone fixes a header;
- any other 4xx: the messages are dead-lettered (counted in ``deadLettered``, logged with the
  status and the start of the answer) and the endpoint goes on. A refused batch is posted
  again one message at a time first, so only the messages refused alone are dead-lettered.

HTTPS verifies the server against ``caFile`` (or the system's CAs), TLS 1.2+.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Sequence

import aiohttp

from gateway.endpoints.envelope import Delivery, json_envelope
from gateway.endpoints.runner import Progress, Session
from gateway.endpoints.spec import HttpEndpointSpec
from gateway.errors import EndpointError

__all__ = ["HttpSink"]

_RETRY_4XX = frozenset({401, 403, 407, 408, 429})
_ANSWER_BYTES = 4096
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def retry_later(status: int) -> bool:
    return status >= 500 or status in _RETRY_4XX


class HttpSink:
    def __init__(self, spec: HttpEndpointSpec, *, user_agent: str = "edge-gateway") -> None:
        self.spec = spec
        self.user_agent = user_agent

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.spec.url.startswith("https:"):
            return False
        try:
            context = ssl.create_default_context(cafile=self.spec.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise EndpointError(f"cannot load CA file {self.spec.ca_file}: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        headers = {"Content-Type": "application/json", "User-Agent": self.user_agent}
        headers.update(self.spec.headers)
        connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=1)
        timeout = aiohttp.ClientTimeout(total=self.spec.timeout_secs)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         headers=headers) as client:
            yield _HttpSession(self.spec, client)


class _HttpSession:
    recovered = 0
    reachable = False

    def __init__(self, spec: HttpEndpointSpec, client: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.client = client

    def idle_timeout(self) -> float | None:
        return None

    async def idle(self) -> None:
        return None

    async def deliver(self, batch: Sequence[Delivery], progress: Progress) -> None:
        size = self.spec.batch
        for start in range(0, len(batch), size):
            chunk = batch[start:start + size]
            refused = await self._post(chunk, array=size > 1)
            if refused is None:
                progress.ack_through(start + len(chunk))
                continue
            if len(chunk) == 1:
                progress.dead_letter(start, refused)
                continue
            # One refused message must not take its neighbours along: post them one by one
            # (still as arrays, so the collector sees the same shape) and settle each.
            for offset, d in enumerate(chunk):
                alone = await self._post([d], array=True)
                if alone is None:
                    progress.ack(start + offset)
                else:
                    progress.dead_letter(start + offset, alone)

    async def _post(self, chunk: Sequence[Delivery], *, array: bool) -> str | None:
        """POST ``chunk``: None when delivered, the reason when the collector refused it
        for good; raises EndpointError when it should be tried again later."""
        envelopes = [json_envelope(d) for d in chunk]
        body = _COMPACT.encode(envelopes if array else envelopes[0]).encode("utf-8")
        try:
            async with self.client.post(self.spec.url, data=body,
                                        allow_redirects=False) as response:
                status = response.status
                # Only the start of the answer is read: a collector cannot make us buffer
                # more (the connection is closed instead of drained).
                head = await response.content.read(_ANSWER_BYTES)
                if 200 <= status < 300:
                    return None
                location = response.headers.get("Location", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EndpointError(f"POST {self.spec.url}: {exc or type(exc).__name__}") from None
        answer = head.decode("utf-8", "replace")[:200].strip()
        reason = f"HTTP {status}" + (f": {answer}" if answer else "")
        if 300 <= status < 400:  # not followed: the URL is wrong, not the messages
            raise EndpointError(f"POST {self.spec.url}: {reason} (redirect to {location!r}"
                                " not followed; fix the endpoint's url)")
        if retry_later(status):
            raise EndpointError(f"POST {self.spec.url}: {reason}")
        return reason
