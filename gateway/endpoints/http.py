"""The ``http`` endpoint: POST the JSON envelope through aiohttp.

``batch = 1`` posts one envelope object per request; ``batch = N > 1`` posts a JSON array of
up to N envelopes (in log order). The answer decides:

- 2xx: delivered (the cursor moves over the request's messages);
- 408, 429 and 5xx, a refused connection, a timeout: retry later, the same messages in the
  same order (so per-device order holds);
- 401, 403 and 407 also retry later: they say the endpoint's credentials are wrong, not the
  messages, so dead-lettering would throw away everything until someone fixes a header;
- any other 4xx: the messages are dead-lettered (counted in ``deadLettered``, logged with the
  status and the start of the answer) and the endpoint goes on.

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
            envelopes = [json_envelope(d) for d in chunk]
            body = _COMPACT.encode(envelopes if size > 1 else envelopes[0]).encode("utf-8")
            try:
                async with self.client.post(self.spec.url, data=body) as response:
                    status = response.status
                    if 200 <= status < 300:
                        await response.read()
                        progress.ack_through(start + len(chunk))
                        continue
                    answer = (await response.text(errors="replace"))[:200].strip()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise EndpointError(f"POST {self.spec.url}: {exc or type(exc).__name__}"
                                    ) from None
            reason = f"HTTP {status}" + (f": {answer}" if answer else "")
            if retry_later(status):
                raise EndpointError(f"POST {self.spec.url}: {reason}")
            for index in range(start, start + len(chunk)):
                progress.dead_letter(index, reason)
