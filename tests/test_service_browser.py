"""The web UI in a real Chromium (the system browser driven by Playwright, headless,
fresh profile): upload a real photo, see the results, click one for "more like
this", see the new results; then start an upgrade (effnet-lite0 -> effnet-lite2, 2 of
5 items moved) and see its progress bar, with a screenshot
(``GALLERIA_UPDATE_SCREENSHOTS=1`` copies it to docs/img/ui-upgrade.png).

Needs Debian's ``chromium`` (``make test`` installs it): missing, the test fails
under ``CI=true`` and is skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from _service import ROOT, ProcessServer

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]
TOKEN = "tok-browser-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _need(what: str, ok: bool) -> None:
    if ok:
        return
    msg = f"{what} is missing: the browser test needs it (make test installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg + " -- under CI this is a failure")
    pytest.skip(msg)


@pytest.fixture()
def browser_page(tmp_path):
    _need(f"Chromium ({CHROMIUM}; apt-get install chromium chromium-driver)",
          Path(CHROMIUM).exists())
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("the playwright Python package (pip install 'galleria[browser]')", False)
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 860}, offline=False)
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            ctx.close()


def _card_ids(page) -> list[str]:
    return page.eval_on_selector_all(".card .id", "els => els.map(e => e.textContent)")


def test_ui_search_more_like_this_and_upgrade_progress(browser_page, photos_gallery, photos,
                                                        tmp_path):
    page = browser_page
    g = tmp_path / "g"
    shutil.copytree(photos_gallery, g)
    (tmp_path / "token").write_text(TOKEN)
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    with ProcessServer(g, "--token-file", str(tmp_path / "token"),
                       log=tmp_path / "server.log") as srv:
        page.goto(srv.url + "/")
        page.wait_for_function("document.querySelector('#stats').textContent.includes('5 items')")
        # pick a real photo: its results appear, itself first, with thumbnails
        page.set_input_files("#file", str(photos / "chelsea.jpg"))
        page.wait_for_function("document.querySelectorAll('.card').length === 5")
        ids = _card_ids(page)
        assert ids[0] == "chelsea.jpg" and sorted(ids) == sorted(
            ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "hubble_deep_field.jpg",
             "retina.jpg"])
        page.wait_for_function("[...document.querySelectorAll('.card img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        assert "chelsea.jpg" in page.inner_text("#message")
        # click another result: more like this
        target = ids[2]
        page.click(f".card[data-id='{target}']")
        page.wait_for_function(
            f"document.querySelector('#query-label').textContent.includes('{target}') && "
            f"document.querySelector('.card .id').textContent === '{target}'")
        assert _card_ids(page)[0] == target and len(_card_ids(page)) == 5
        # an upgrade in progress: the progress bar shows how far it is
        with httpx.Client(base_url=srv.url, timeout=300) as c:
            r = c.post("/v1/upgrade", headers=AUTH, json={"action": "start",
                                                           "new_model": "effnet-lite2"})
            assert r.status_code == 200, r.text
            r = c.post("/v1/upgrade", headers=AUTH, json={"action": "run", "limit": 2})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 240
            while c.get("/v1/upgrade").json()["server_run"]["running"]:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            st = c.get("/v1/upgrade").json()
            assert st["done"] == 2 and st["total"] == 5, st
        page.wait_for_selector("#upgrade:not([hidden])")
        page.wait_for_function(
            "document.querySelector('#upgrade-bar').getAttribute('aria-valuenow') === '40.0'")
        page.wait_for_function(  # the bar is drawn at 40 % (after its CSS transition)
            "Math.abs(document.querySelector('#upgrade-fill').getBoundingClientRect().width / "
            "document.querySelector('#upgrade-bar').getBoundingClientRect().width - 0.4) < 0.01")
        assert "2 of 5 items" in page.inner_text("#upgrade-text")
        page.set_input_files("#file", str(photos / "coffee.jpg"))
        page.wait_for_function("document.querySelector('#message').textContent"
                               ".includes('merging two models')")
        page.wait_for_function("[...document.querySelectorAll('.card img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        assert _card_ids(page)[0] == "coffee.jpg"
        shot = tmp_path / "ui-upgrade.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("GALLERIA_UPDATE_SCREENSHOTS") == "1":
            (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ROOT / "docs" / "img" / "ui-upgrade.png")
    assert not external, external  # the UI loads nothing from the internet
