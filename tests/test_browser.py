"""The inspection notebook in a real browser: served by Voilà on localhost, opened in Debian's headless
Chromium through Playwright. It finds the picker and a branch output, searches a sample, raises the
temperature, clicks Run, waits for the new text, and saves the screenshot the guide shows.

Needs ``/usr/bin/chromium`` (``scripts/install_browser.sh``) and the ``playwright`` package (its
driver only; no ``playwright install``). Skipped locally when they are missing; in CI (``CI`` set)
that is a failure, unless ``PMACCEL_SKIP_BROWSER`` gives the reason they could not be installed (set
by scripts/test.sh). ``PMACCEL_UPDATE_SCREENSHOT=1`` copies the screenshot to docs/images/inspector.png.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers_notebooks import NOTEBOOKS, write_kernelspec

# scripts/test.sh sets PMACCEL_SKIP_BROWSER to the reason when it could not install Chromium.
SKIP_BROWSER = os.environ.get("PMACCEL_SKIP_BROWSER", "")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(SKIP_BROWSER), reason=SKIP_BROWSER)]

CHROMIUM = os.environ.get("PMACCEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "inspector.png"
TIMEOUT_MS = 180_000  # kernel start, model load and the notebook's cells, on a 2-core CPU


def _need(ok: bool, what: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} (CI runs scripts/install_browser.sh and installs the test extra)")
        pytest.skip(what)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"voila exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"voila did not answer at {url}:\n{log.read_text()[-3000:]}")


@pytest.fixture
def voila_url(tmp_path):
    """Serve notebooks/inspect.ipynb with Voilà; its results file lives in tmp_path (made by the notebook)."""
    jupyter = write_kernelspec(tmp_path / "jupyter")
    env = dict(os.environ, PMACCEL_RESULTS=str(tmp_path / "results.jsonl"),
               JUPYTER_PATH=os.pathsep.join([str(jupyter), os.environ.get("JUPYTER_PATH", "")]))
    port = _free_port()
    log = tmp_path / "voila.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "voila", str(NOTEBOOKS / "inspect.ipynb"), "--no-browser", f"--port={port}",
             "--Voila.ip=127.0.0.1", "--VoilaConfiguration.show_tracebacks=True"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, proc, log)
        yield url, tmp_path, log
    finally:
        with contextlib.suppress(ProcessLookupError):  # voila may have exited already (its error is raised above)
            os.killpg(proc.pid, signal.SIGTERM)  # voila and the kernel it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_inspector_in_chromium(voila_url):
    _need(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _need(False, "the playwright package is not installed")
    url, work, log = voila_url
    from pmaccel.rows import example_path

    target = json.loads(example_path().read_text().splitlines()[1])  # the notebook's sample 1

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2000})
            page.goto(url, timeout=TIMEOUT_MS)
            app = page.locator(".pmaccel-inspector")
            try:
                app.wait_for(state="visible", timeout=TIMEOUT_MS)
            except Exception:
                raise AssertionError(f"the app did not appear:\n{log.read_text()[-3000:]}") from None

            # the picker and a branch output
            picker = app.locator(".widget-slider").filter(has_text="sample")
            expect(picker).to_be_visible()
            outputs = app.locator(".pm-output-text")
            expect(outputs.first).not_to_be_empty()
            expect(app.locator(".pm-grid table")).to_be_visible()

            # search a sample, raise the temperature, switch the mask, run it
            search = app.locator(".widget-text").filter(has_text="find").locator("input")
            search.fill(str(target["id"]))
            search.press("Enter")
            expect(app.get_by_text("found: sample 1")).to_be_visible(timeout=30_000)
            before = outputs.all_inner_texts()
            temperature = app.locator(".widget-text").filter(has_text="temperature").locator("input")
            temperature.fill("0.9")
            temperature.press("Enter")
            app.get_by_role("button", name="columnar").click()  # ParallelMind's mask
            app.get_by_role("button", name="Run").click()
            expect(app.get_by_text("done:")).to_be_visible(timeout=60_000)
            after = outputs.all_inner_texts()
            assert len(after) == len(before) == len(target["branches"])
            assert after != before and all(text.strip() for text in after)
            assert "temperature=0.9" in app.inner_text() and "mask=columnar" in app.inner_text()

            # save it: the line lands next to the results
            app.get_by_role("button", name="Save").click()
            expect(app.get_by_text("saved sample 1")).to_be_visible(timeout=30_000)
            saved = (work / "results.inspected.jsonl").read_text().splitlines()
            assert len(saved) == 1 and json.loads(saved[0])["id"] == target["id"]

            shot = work / "inspector.png"
            app.screenshot(path=str(shot))  # the app alone, for the guide
        finally:
            browser.close()
    assert shot.stat().st_size > 50_000 and shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("PMACCEL_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
