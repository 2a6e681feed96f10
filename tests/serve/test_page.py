"""The page at ``/`` in a real browser: Debian's headless Chromium, driven by Selenium (``.ci/run``
installs both). It must fail, never skip, where they are missing."""

from __future__ import annotations

import shutil

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.serve.conftest import Offline

SENTENCE = "the small dog sleeps in the garden ."


def chromium() -> webdriver.Chrome:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, ("Chromium and its driver are needed (Debian: apt-get install "
                                "chromium chromium-driver; .ci/run installs them)")
    options = Options()
    options.binary_location = browser
    for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1100,900"]:
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_translates_and_shows_attention(server, checkpoint, tmp_path):
    expected = Offline(checkpoint, [SENTENCE], tmp_path)
    browser = chromium()
    try:
        browser.get(server.url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#pair option"))
        assert Select(browser.find_element(By.ID, "pair")).first_selected_option.text == (
            "English \u2192 German")
        browser.find_element(By.ID, "text").send_keys(SENTENCE)
        browser.find_element(By.ID, "translate").click()
        wait.until(lambda b: b.find_elements(By.ID, "heatmap")
                   or b.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text == ""
        expected.check([browser.find_element(By.ID, "result").text], strip=True)
        heatmap = browser.find_element(By.ID, "heatmap")
        rows = heatmap.find_elements(By.CSS_SELECTOR, "tbody tr")
        columns = heatmap.find_elements(By.CSS_SELECTOR, "thead th")
        assert len(rows) >= 1 and len(columns) >= 3  # a corner cell, pieces, "</s>"
        assert columns[-1].text == "</s>"
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        browser.quit()
