from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.federation.hierarchy import Hierarchy, start


@pytest.fixture
def hierarchy(tmp_path: Path) -> Iterator[Hierarchy]:
    h = start(tmp_path)
    yield h
    h.stop()
