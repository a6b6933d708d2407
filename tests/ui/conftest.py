"""Browser tests of the technician's web page: a real hub (subprocess) and Debian's Chromium,
headless, driven by selenium through Debian's chromedriver (dev.sh setup_test installs both).

Screenshots at desktop (1280x800) and phone (390x844) sizes go to ``tests/artifacts/ui/``
(``UI_ARTIFACTS`` overrides it); the directory is printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401  (imported here, before any test thread: its plugin imports it
import pytest       # at the end of the run, where CPython 3.11.7 then fails its AST check)

from tests.hubproc import REPO, HubProcess

ADDRESS = "127.0.25.70"
PASSWORD = "correct horse battery"
ARTIFACTS = Path(os.environ.get("UI_ARTIFACTS", REPO / "tests" / "artifacts" / "ui"))
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}


def set_password(data_dir: Path, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "admin", "set-password", "--data-dir", str(data_dir)],
        input=password + "\n", text=True, capture_output=True, cwd=REPO, timeout=60)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {ARTIFACTS}")
    return ARTIFACTS


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are required (dev.sh setup_test)")
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,800"):
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the hub's own CA, not in Chromium's store
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def start_hub(tmp_path: Path, extra_config: str = "", *, password: str | None = PASSWORD,
              env: dict[str, str] | None = None, **kw: Any) -> HubProcess:
    data_dir = tmp_path / "data"
    if password is not None:
        result = set_password(data_dir, password)
        assert result.returncode == 0, result.stderr
    hub = HubProcess(data_dir, address=ADDRESS, extra_config=extra_config, log_level="info", **kw)
    if env:
        os.environ.update(env)
    return hub.start()


def base_url(hub: HubProcess) -> str:
    return f"https://{ADDRESS}:{hub.info['api_port']}"
