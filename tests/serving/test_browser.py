"""The pages in a real browser: Debian's chromium driven by Playwright (never a downloaded browser).

The screen updates live from the stream without a reload and raises the alarm when the floor is
crossed; an engineer signs in, opens a flagged module, corrects a cell with the keyboard and the
decision lands in the audit trail; a heat map that arrives after the next module was opened is
not drawn over it; a frame that is gone (pruned by the retention policy, or lost)
reads as text on the review page, not as a broken image, and gets no heat map request; a preview
whose retry succeeds is shown; a line key cannot open the review page.
Each page is saved as a screenshot under test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from serving.db import Inspection, make_engine, utcnow
from serving.retention import prune_frames
from serving.settings import LineConfig
from serving.store import FrameStore
from tests.serving.conftest import MakeSettings, serve_in_thread
from tests.serving.helpers import AUTH, BRIGHT, DARK, MID, module_frame, png

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIGNIN = re.compile(r".*/signin\?next=.*")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = pytest.mark.slow


def frame(rows: int, cols: int, dark: list[tuple[int, int]] = (), mid: list[tuple[int, int]] = ()) -> bytes:  # type: ignore[assignment]
    levels = np.full((rows, cols), BRIGHT)
    for cell in dark:
        levels[cell] = DARK
    for cell in mid:
        levels[cell] = MID
    return png(module_frame(levels))


def post(client: httpx.Client, line: str, serial: str, body: bytes) -> int:
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    response = client.post(f"/lines/{line}/modules", content=body, headers=headers)
    assert response.status_code == 201, response.text
    return int(response.json()["inspection_id"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        problem = f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (make browser)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (CI=true: the browser tests must run, not skip)")
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def site(make_settings: MakeSettings) -> Iterator[dict[str, Any]]:
    settings = make_settings(
        lines={
            "L1": LineConfig(
                rows=6, cols=10, name="Line 1 · 60 cells", pass_rate_floor=0.9, takt_seconds=600
            ),
            "L2": LineConfig(
                rows=6, cols=24, name="Line 2 · 144 half-cells", pass_rate_floor=0.9, takt_seconds=600
            ),
        },
        events_min_interval_seconds=0.05,
        alarm_check_seconds=1.0,
    )
    with serve_in_thread(settings) as address:
        base = f"http://{address}"
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as api:
            keys = {
                role: api.post("/keys", json={"name": name, "role": role, "line_id": line}).json()["key"]
                for name, role, line in (("eng", "engineer", None), ("line-1", "line", "L1"))
            }
            yield {"base": base, "api": api, "keys": keys}
    ARTIFACTS.mkdir(exist_ok=True)


def sign_in(page: Any, base: str, path: str, key: str) -> None:
    page.goto(f"{base}{path}")
    page.wait_for_url(SIGNIN)  # asked to sign in first
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}{path}")


def shoot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_screen_updates_live_and_raises_the_alarm(browser: Any, site: dict[str, Any]) -> None:
    api, base = site["api"], site["base"]
    for i in range(5):  # some history so the tiles are not empty
        post(api, "L2", f"B{i}", frame(6, 24, dark=[(1, 5)] if i == 3 else []))
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    sign_in(page, base, "/screen", site["keys"]["engineer"])
    page.wait_for_selector("#line-L1")
    page.evaluate("() => { window.notReloaded = true; }")

    post(api, "L1", "A1", frame(6, 10))
    # within 2 s of the post, without a reload
    page.wait_for_function(
        "() => document.querySelector('#line-L1 [data-field=rate-last]').textContent === '100.0%'",
        timeout=2000,
    )
    assert page.evaluate("() => window.notReloaded") is True
    assert page.get_attribute("#line-L1", "data-state") == "ok"

    post(api, "L1", "A2", frame(6, 10, dark=[(2, 3), (2, 4)]))  # 1 of 2 passes: below the 90% floor
    page.wait_for_selector("#line-L1[data-state=alarm]", timeout=3000)
    assert "below the floor" in page.text_content("#line-L1 .alarm-text")
    page.wait_for_selector("#line-L1 .thumb img")
    page.wait_for_function(
        "() => [...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator("#line-L1 .thumb polygon.defect").count() == 2
    assert page.evaluate("() => window.notReloaded") is True
    shoot(page, "screen.png")
    page.close()


def test_engineer_corrects_a_cell_with_the_keyboard(browser: Any, site: dict[str, Any]) -> None:
    api, base = site["api"], site["base"]
    post(api, "L1", "OK1", frame(6, 10))
    flagged = post(api, "L1", "X1", frame(6, 10, dark=[(3, 7)], mid=[(0, 1)]))
    page = browser.new_page(viewport={"width": 1680, "height": 1050})
    sign_in(page, base, "/review", site["keys"]["engineer"])
    page.wait_for_selector(f"#queue li[data-inspection='{flagged}']")
    page.keyboard.press("j")  # the first module of the queue: the newest flagged one
    page.wait_for_selector("#grid polygon.cell")
    page.wait_for_function(
        "() => [...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    # the first flagged cell is selected; n walks to the next one: the defective cell at 3,7
    page.keyboard.press("n")
    assert "row 3, col 7" in page.text_content("#cell-facts")
    page.keyboard.press("h")
    page.wait_for_function("() => document.getElementById('heat-note').textContent.includes('p=')")
    page.keyboard.press("f")  # not defective after all
    assert "cell 3,7 → functional" in page.text_content("#changes")
    page.keyboard.press("/")
    page.keyboard.type("bright spot from a reflection")
    page.keyboard.press("Escape")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('saved')")
    # the mid-grey cell at 0,1 is still 'uncertain': no module verdict is implied, none was saved
    assert "undecided: 1 uncertain cell left" in page.text_content("#module-choice")
    trail = api.get("/review/decisions", params={"inspection_id": flagged}).json()
    assert [(d["target"], d["row"], d["col"], d["after"].get("label"), d["reviewer"]) for d in trail] == [
        ("cell", 3, 7, "functional", "eng")
    ]
    assert trail[0]["before"]["label"] == "defective" and trail[0]["note"] == "bright spot from a reflection"

    page.keyboard.press("n")  # on to the uncertain cell, also functional
    assert "row 0, col 1" in page.text_content("#cell-facts")
    page.keyboard.press("f")
    assert page.text_content("#module-choice") == "PASS (from cell labels)"
    page.keyboard.press("j")  # moving on would drop the unsaved label: the page asks first
    assert "1 unsaved label(s)" in page.text_content("#status")
    assert "row 0, col 1" in page.text_content("#cell-facts")
    page.keyboard.press("s")
    page.wait_for_function("() => document.getElementById('module-choice').textContent === 'PASS (saved)'")
    shoot(page, "review.png")
    page.close()

    trail = api.get("/review/decisions", params={"inspection_id": flagged}).json()
    assert [(d["target"], d["row"], d["col"]) for d in trail] == [
        ("cell", 3, 7),
        ("module", None, None),  # one save writes the module first, then its cells
        ("cell", 0, 1),
    ]
    module = trail[1]
    assert module["after"]["verdict"] == "PASS" and module["before"]["verdict"] == "FAIL"


# whether anything is drawn on the heat map's canvas (256 x 256)
HEAT_DRAWN = (
    "() => document.getElementById('heat').getContext('2d').getImageData(0, 0, 256, 256).data.some(Boolean)"
)


def test_a_late_heat_map_is_not_drawn_over_the_next_module(browser: Any, site: dict[str, Any]) -> None:
    api, base = site["api"], site["base"]
    second = post(api, "L1", "B1", frame(6, 10, dark=[(1, 1)]))
    first = post(api, "L1", "A1", frame(6, 10, dark=[(4, 8)]))  # the newest: first in the queue
    page = browser.new_page(viewport={"width": 1680, "height": 1050})
    sign_in(page, base, "/review", site["keys"]["engineer"])
    page.wait_for_selector(f"#queue li[data-inspection='{second}']")
    assert page.eval_on_selector_all("#queue li", "items => items.map(li => li.dataset.inspection)") == [
        str(first),
        str(second),
    ]
    held: list[Any] = []  # A's heat map requests, answered when the test says so
    page.route(f"**/review/inspections/{first}/cells/*/*/heatmap", lambda route: held.append(route))
    page.keyboard.press("j")
    page.wait_for_selector(f"#queue li.current[data-inspection='{first}']")
    page.keyboard.press("h")
    page.wait_for_function("() => document.getElementById('heat-note').textContent === 'computing…'")
    for _ in range(200):
        if held:
            break
        page.wait_for_timeout(25)
    assert len(held) == 1
    page.keyboard.press("j")  # on to B before A's heat map came
    page.wait_for_selector(f"#queue li.current[data-inspection='{second}']")
    assert "row 1, col 1" in page.text_content("#cell-facts")

    with page.expect_response(lambda response: "/heatmap" in response.url) as late:
        held[0].continue_()  # A's heat map arrives now, B on show
    assert late.value.ok and late.value.finished() is None
    page.wait_for_timeout(500)  # the page reads it and decodes its image in milliseconds
    assert page.text_content("#heat-note") == "Press h for the selected cell."
    assert not page.evaluate(HEAT_DRAWN), "A's heat map was drawn over module B"
    assert page.get_attribute("#heat", "data-heat") is None
    page.unroute(f"**/review/inspections/{first}/cells/*/*/heatmap")

    page.keyboard.press("h")  # B's own heat map is drawn
    page.wait_for_function("() => document.getElementById('heat-note').textContent.includes('p=')")
    assert page.text_content("#heat-note").startswith("cell 1,1: p=")
    assert page.get_attribute("#heat", "data-heat") == f"{second}:1,1"
    assert page.evaluate(HEAT_DRAWN)

    # an answer that is not JSON says so in the heat note, not as an exception
    page.route(
        f"**/review/inspections/{second}/cells/*/*/heatmap",
        lambda route: route.fulfill(status=200, content_type="application/json", body="<html>proxy"),
    )
    page.keyboard.press("h")
    page.wait_for_function("() => document.getElementById('heat-note').textContent.startsWith('No heat map')")
    assert "could not be read" in page.text_content("#heat-note")
    assert page.text_content("#status") == ""
    page.close()


def test_a_frame_that_is_gone_reads_as_text_not_a_broken_image(
    browser: Any, make_settings: MakeSettings
) -> None:
    settings = make_settings(review_pass_sample_rate=0.0)
    frames = FrameStore(settings.resolved_frames_dir)
    lost_body = frame(6, 10, mid=[(0, 0)])  # a REVIEW: never pruned, its file is deleted by hand below
    cached_body = frame(6, 10, mid=[(1, 1)])  # the same, but its preview was made before
    with serve_in_thread(settings) as address:
        base = f"http://{address}"
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as api:
            key = api.post("/keys", json={"name": "eng", "role": "engineer"}).json()["key"]
            pruned = post(api, "L1", "OLD", frame(6, 10))
            lost = post(api, "L1", "LOST", lost_body)
            cached = post(api, "L1", "CACHED", cached_body)
            assert api.get(f"/inspections/{cached}/preview", params={"width": 1600}).status_code == 200
            blip = post(api, "L1", "BLIP", frame(6, 10, dark=[(2, 2)]))  # its frame stays
        engine = make_engine(settings.resolved_database_url)
        try:
            sessions = sessionmaker(engine, expire_on_commit=False)
            with sessions() as session:  # the PASS module is 40 days old now
                old = utcnow() - timedelta(days=40)
                session.execute(update(Inspection).where(Inspection.id == pruned).values(created_at=old))
                session.commit()
            assert prune_frames(sessions, frames, 30, 0.0).frames == 1
        finally:
            engine.dispose()
        for body in (lost_body, cached_body):
            frames.path_for(hashlib.sha256(body).hexdigest(), "png").unlink()

        page = browser.new_page(viewport={"width": 1680, "height": 1050})
        requested: list[str] = []
        page.on("request", lambda request: requested.append(urlsplit(request.url).path))
        sign_in(page, base, "/review", key)
        page.goto(f"{base}/review#inspection={pruned}")
        page.reload()  # the page opens the module its address names when it starts
        page.wait_for_selector("#grid polygon.cell")  # the grid stays, cells can still be labelled
        assert "Frame removed by the retention policy on" in page.text_content("#frame-gone")
        assert page.query_selector("#module img") is None  # no request for a frame that is gone
        page.keyboard.press("h")
        assert "removed by the retention policy" in page.text_content("#heat-note")
        shoot(page, "review-pruned.png")

        page.goto(f"{base}/review#inspection={lost}")
        page.reload()
        page.wait_for_selector("#frame-gone")  # the preview's 410 replaced the image with its reason
        assert "could not be shown" in page.text_content("#frame-gone")
        assert page.text_content("#frame-gone").count("is no longer stored") == 1  # the server's text, once
        page.keyboard.press("ArrowRight")  # a redraw shows what the page learned, asking nothing again
        assert page.locator("#frame-gone").count() == 1 and page.query_selector("#module img") is None
        page.keyboard.press("h")  # a frame the page knows is gone: no heat map is asked for
        page.wait_for_function(
            "() => document.getElementById('heat-note').textContent.startsWith('No heat map')"
        )
        assert "is no longer stored" in page.text_content("#heat-note")
        assert requested.count(f"/inspections/{lost}/preview") == 2  # the image, and one retry for its reason
        assert not [path for path in requested if path.startswith(f"/review/inspections/{lost}/cells/")]

        # a preview made before the frame was lost still shows; the heat map's 410 is remembered
        page.goto(f"{base}/review#inspection={cached}")
        page.reload()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#module img')].some(i => i.complete && i.naturalWidth > 0)"
        )
        for _ in range(2):
            page.evaluate("() => { document.getElementById('heat-note').textContent = ''; }")
            page.keyboard.press("h")
            page.wait_for_function(
                "() => document.getElementById('heat-note').textContent.startsWith('No heat map')"
            )
            assert "is no longer stored" in page.text_content("#heat-note")
        assert (
            len([path for path in requested if path.startswith(f"/review/inspections/{cached}/cells/")]) == 1
        )
        assert page.query_selector("#frame-gone") is None

        # a preview that fails once and loads on its retry shows the image, from the retry's bytes
        failures: list[str] = []

        def fail_once(route: Any) -> None:
            if failures:
                route.continue_()
                return
            failures.append(route.request.url)
            route.fulfill(status=503, content_type="application/json", body='{"error": "busy, try again"}')

        page.route(f"**/inspections/{blip}/preview*", fail_once)
        page.goto(f"{base}/review#inspection={blip}")
        page.reload()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#module img')].some("
            "i => i.src.startsWith('data:image/jpeg') && i.complete && i.naturalWidth > 0)"
        )
        assert failures and page.query_selector("#frame-gone") is None
        page.keyboard.press("ArrowRight")  # redrawn from the same bytes, not downloaded again
        page.wait_for_function(
            "() => [...document.querySelectorAll('#module img')].some(i => i.complete && i.naturalWidth > 0)"
        )
        assert requested.count(f"/inspections/{blip}/preview") == 2
        page.keyboard.press("h")  # the frame is there: its heat map is computed
        page.wait_for_function("() => document.getElementById('heat-note').textContent.includes('p=')")
        shoot(page, "review-preview-retried.png")
        page.close()


def test_a_line_key_cannot_open_the_review_page(browser: Any, site: dict[str, Any]) -> None:
    base = site["base"]
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{base}/review")
    page.wait_for_url(SIGNIN)
    shoot(page, "signin.png")
    page.fill("#key", site["keys"]["line"])
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/review")
    assert "Not allowed" in page.text_content("h1")
    assert "needs the role engineer" in " ".join(page.text_content("main").split())
    response = page.request.get(f"{base}/review/queue")
    assert response.status == 403
    shoot(page, "forbidden.png")
    page.close()


@pytest.mark.parametrize(
    "next_path",
    [
        "%2F%5Cevil.example",  # "/\evil.example"
        "%2F%09%2Fevil.example",  # "/<tab>/evil.example"
        "https://evil.example/",
        "%2F.%2F%2Fevil.example",  # "/.//evil.example": its path normalises to "//evil.example"
        "%2Fa%2F..%2F%2Fevil.example",
    ],
)
def test_sign_in_never_sends_the_browser_to_another_site(
    browser: Any, site: dict[str, Any], next_path: str
) -> None:
    # each starts with one slash or names another site, yet browsers would read it as another origin
    base = site["base"]
    page = browser.new_page()
    # never leave 127.0.0.1: a request to the other site is aborted (and the URL wait below fails)
    page.route(lambda url: urlsplit(url).hostname == "evil.example", lambda route: route.abort())
    page.goto(f"{base}/signin?next={next_path}")
    page.fill("#key", site["keys"]["engineer"])
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/signin" not in url)
    assert urlsplit(page.url).netloc == urlsplit(base).netloc, page.url
    page.close()


def test_chromium_is_debian_s(browser: Any) -> None:
    assert shutil.which("chromium") == CHROMIUM and browser.version
