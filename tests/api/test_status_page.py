"""The status page in a real headless browser (Debian's chromium + chromium-driver, installed
by tests/run): tiles and sparklines render from a running appliance, an injected simulator fault
shows up as an alert within seconds, the page fits a phone, and the console stays clean."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from api_fixtures import RunningCell

pytestmark = [pytest.mark.browser, pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCell]:
    with RunningCell(tmp_path_factory.mktemp("page")) as rc:
        yield rc


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None or shutil.which("chromium") is None:
        pytest.fail(
            "chromium/chromedriver are not installed: run "
            "`apt-get install -y chromium chromium-driver` (tests/run does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1280,900")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager never downloads anything
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait(cond: Callable[[], object], timeout_s: float, what: str) -> float:
    """Poll ``cond()`` until true; the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except Exception:  # an element replaced between find and read: try again
            pass
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def test_tiles_and_sparklines_render_for_every_machine(cell: RunningCell, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.get(cell.base + "/")

    def tiles() -> list[object]:
        return list(d.find_elements(By.CSS_SELECTOR, "#devices .tile"))

    wait(lambda: len(tiles()) == 2, 15, "two device tiles")
    assert [t.get_attribute("data-device") for t in tiles()] == ["cnc-1", "cnc-2"]

    def drawn() -> bool:
        lines = d.find_elements(By.CSS_SELECTOR, "#devices .tile svg.spark polyline")
        # score + 4 main channels per tile, each with at least two points
        return len(lines) == 10 and all(
            len((p.get_attribute("points") or "").split()) >= 2 for p in lines
        )

    wait(drawn, 20, "sparklines with two points or more")
    text = d.find_element(By.CSS_SELECTOR, '.tile[data-device="cnc-1"]').text
    assert "online" in text and "spindle_temp" in text and "anomaly score" in text
    assert d.find_element(By.ID, "ready").text == "ready"
    assert d.title == "api-test status"


def test_an_injected_fault_appears_as_an_alert_on_the_page_within_seconds(
    cell: RunningCell, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.get(cell.base + "/")
    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#devices .tile")) == 2, 15, "tiles")
    assert d.find_elements(By.CSS_SELECTOR, "#alerts li.alert") == []
    cell.call(lambda: cell.cell.inject(1, "temp_ramp", 6.0))  # 2 wall s at 3x time
    raised = wait(lambda: cell.call(cell.app.alerts.active), 20, "the alert raised")

    def shown() -> bool:
        items = d.find_elements(By.CSS_SELECTOR, "#alerts li.alert")
        return any("spindle_overtemp" in i.text and "cnc-2" in i.text for i in items)

    on_page = wait(shown, 5, "the alert on the page")
    assert on_page < 3.0, f"the page showed the alert {on_page:.1f} s after it was raised"
    assert raised + on_page < 15.0
    item = d.find_element(By.CSS_SELECTOR, "#alerts li.alert")
    assert item.get_attribute("data-alert-id").startswith("spindle_overtemp:cnc-2:")
    assert "major" in item.text


def test_the_page_fits_a_phone_screen(cell: RunningCell, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.set_window_size(390, 844)
    try:
        d.get(cell.base + "/")
        wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#devices .tile")) == 2, 15, "tiles")
        inner = d.execute_script("return window.innerWidth")
        scroll = d.execute_script("return document.documentElement.scrollWidth")
        assert scroll <= inner, f"page is {scroll} px wide in a {inner} px viewport"
        for tile in d.find_elements(By.CSS_SELECTOR, "#devices .tile"):
            assert tile.size["width"] <= inner
    finally:
        d.set_window_size(1280, 900)


def test_the_page_logs_no_console_errors(cell: RunningCell, browser: Any) -> None:
    d = browser
    d.get(cell.base + "/")
    time.sleep(2.5)  # a few refreshes
    logs = d.get_log("browser")
    errors = [e for e in logs if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
