"""Fixtures: a real server with the tiny model, and headless Chromium driven by Playwright."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # the shared live_server helpers

from live_server import TINY_CONTEXT, live_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="package")
def playground_server(tmp_path_factory, tiny_llama_with_tokenizer):
    engine = {"model": str(tiny_llama_with_tokenizer[0]), "max_model_len": TINY_CONTEXT}
    with live_server(tmp_path_factory.mktemp("logs"), engine, served_model_name="tiny") as server:
        yield server


@pytest.fixture(scope="package")
def browser():
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, playground_server):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(playground_server.url)
    page.wait_for_selector("#status.ready", timeout=60_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
