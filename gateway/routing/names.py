"""The route names a message matched, with the text the log stores them as. Pure.

The router gives one :class:`RouteNames` per distinct outcome of a property set and hands the
same object to every message with that outcome, so the log's row (route names joined by
commas, :func:`gateway.store._log_sql.ROW_OF`) is joined once per outcome, not per message.
It is a tuple: equal to, and used everywhere as, the plain tuple of the names.
"""

from __future__ import annotations


class RouteNames(tuple[str, ...]):
    """Route names in order; ``text`` is them joined by commas (route names have none)."""

    text: str

    def __new__(cls, names: tuple[str, ...] | list[str] = ()) -> RouteNames:
        self = super().__new__(cls, names)
        self.text = ",".join(self)
        return self
