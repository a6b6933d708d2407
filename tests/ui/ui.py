"""Helpers the browser tests share: log in, wait for text, screenshots, console errors."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.ui.conftest import PASSWORD, SIZES

T = TypeVar("T")


def until(fn: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # the page is still changing
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last: {last})" if last else ""))


def by_id(driver: Any, id_: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def login(driver: Any, url: str, password: str = PASSWORD) -> None:
    driver.get(url + "/ui/login")
    field = by_id(driver, "password")
    field.clear()
    field.send_keys(password)
    by_id(driver, "login").click()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def shots(driver: Any, directory: Path, name: str) -> None:
    """Screenshots of the page at desktop and phone sizes (the page is laid out for both)."""
    for size, (w, h) in SIZES.items():
        driver.set_window_size(w, h)
        time.sleep(0.3)
        driver.save_screenshot(str(directory / f"{name}-{size}.png"))
    driver.set_window_size(*SIZES["desktop"])
