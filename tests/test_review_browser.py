"""The review page in a real browser (Debian's chromium through Selenium and chromium-driver):
swap a keeper with a click, mark a file not-duplicate with the keyboard, and the next
`mgdedup dedup --format json` shows both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else None)
try:
    import selenium  # noqa: F401

    SELENIUM = True
except ImportError:
    SELENIUM = False

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and SELENIUM),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver) and selenium (in the [test] extras)")


@pytest.fixture
def review_process(lib):
    root, index_dir = lib
    process = subprocess.Popen(
        [sys.executable, "-m", "mgdedup", "review", "--index", str(index_dir), "--no-open"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    url = None
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "review at " in line:
            url = line.split("review at ", 1)[1].split()[0]
            break
    if url is None:
        process.kill()
        pytest.fail("mgdedup review printed no URL: " + "".join(lines))
    yield root, index_dir, url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _ready(driver) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.body.dataset.ready") == "true")


def test_swap_keeper_and_not_duplicate_reach_dedup(review_process, browser, tmp_path):
    from selenium.webdriver.common.by import By

    root, index_dir, url = review_process
    browser.get(url)
    _ready(browser)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#group-list li")) == 3
    first = browser.find_elements(By.CSS_SELECTOR, "#group .file")
    assert [card.get_attribute("data-role") for card in first] == \
        ["keeper", "member", "member"]
    assert browser.find_element(By.CSS_SELECTOR, "#group .reason").text.startswith("keeper: ")
    # every thumbnail loaded (served through the token, decoded by the browser)
    assert browser.execute_script(
        "return [...document.querySelectorAll('#group img')].every(i => i.complete && "
        "i.naturalWidth > 0)")
    screenshot = Path(os.environ.get("MGDEDUP_SCREENSHOT_DIR", tmp_path)) / "review-page.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(screenshot))
    print(f"review page screenshot: {screenshot}")

    new_keeper = first[1].get_attribute("data-path")
    first[1].find_element(By.CSS_SELECTOR, 'button[data-action="keeper"]').click()
    _ready(browser)
    assert "saved: keeper" in browser.find_element(By.ID, "status").text

    # keyboard: next group, the first duplicate is selected, "n" marks it not-duplicate
    body = browser.find_element(By.TAG_NAME, "body")
    group_before = browser.find_element(By.CSS_SELECTOR, "#group .group-head"
                                        ).get_attribute("data-group")
    body.send_keys("j")
    group_now = browser.find_element(By.CSS_SELECTOR, "#group .group-head")
    assert group_now.get_attribute("data-group") != group_before
    selected = browser.find_element(By.CSS_SELECTOR, "#group .file.selected")
    not_duplicate = selected.get_attribute("data-path")
    assert selected.get_attribute("data-role") == "member"
    body.send_keys("n")
    _ready(browser)
    assert "saved: not-duplicate" in browser.find_element(By.ID, "status").text

    # the compare view shows the keeper and the selected file at full size
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("c")
    _ready(browser)
    assert browser.find_element(By.ID, "compare").is_displayed()

    done = run("dedup", "--index", index_dir, "--format", "json")
    document = json.loads(done.stdout)
    keepers = {g["keeper"]: g["keeper_reason"] for g in document["groups"]}
    assert keepers.get(new_keeper) == "chosen in review"
    assert not_duplicate not in {f["path"] for g in document["groups"] for f in g["files"]}
    assert screenshot.stat().st_size > 10_000
