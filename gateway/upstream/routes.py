"""Which stored messages go up, and under which route's queue policy: the route table's
``$upstream`` routes (IoT Hub ref §6.2), read from the hub's current router on every call so a
route created, changed or deleted live takes effect at once.

When no route names ``$upstream``, IoT Edge's default ``FROM /messages/* INTO $upstream``
applies (every device and module telemetry message, under the route name ``$upstream``). A
route's ``priority``, ``timeToLiveSecs`` and ``liveFirst`` override the ``[upstream]`` defaults of
its queue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from gateway.routing.model import UPSTREAM
from gateway.routing.router import Router
from gateway.store.log import Entry
from gateway.upstream.policy import RoutePolicy, default_select


def routed_select(router: Callable[[], Router]) -> Callable[[Entry], str | None]:
    seen: list[tuple[Router, frozenset[str]]] = []  # the last router and its $upstream routes

    def select(entry: Entry) -> str | None:
        current = router()
        if seen and seen[0][0] is current:
            names = seen[0][1]
        else:
            names = frozenset(current.endpoint_routes(UPSTREAM))
            seen[:] = [(current, names)]
        if not names:
            return default_select(entry.kind)
        for name in entry.routes:
            if name in names:
                return name
        return None

    return select


def routed_policy(router: Callable[[], Router],
                  default: RoutePolicy) -> Callable[[str], RoutePolicy]:
    def policy_of(route: str) -> RoutePolicy:
        spec = router().state.route(route)
        if spec is None:
            return default
        policy = default
        if spec.priority is not None:
            policy = replace(policy, priority=spec.priority)
        if spec.ttl is not None:
            policy = replace(policy, ttl=float(spec.ttl))
        if spec.live_first is not None:
            policy = replace(policy, live_first=spec.live_first)
        return policy

    return policy_of
