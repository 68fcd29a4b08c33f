"""Notebook 08 in a real browser: JupyterLab on 127.0.0.1, headless Chromium driven by Playwright.

Runs every cell (quick mode), then uses the denoising explorer as a learner would: types a prompt
and presses Run, moves the step slider, types an absurd step count; after each, the picture (or
the message) on the page must change. A screenshot of the page is kept in `test-artifacts/`
(or $MINISD_ARTIFACTS). Needs Debian's `chromium` and the `playwright` package: `.ci/run`
installs both, and in CI (CI=true) their absence fails the test instead of skipping it.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "08_denoising_explorer.ipynb"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ALL_RUN = """() => { const cells = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
                  return cells.length > 0 && cells.every(c => /\\[\\d+\\]/.test(c.textContent)); }"""
BUSY = """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].some(c => c.textContent.includes('*'))
               || document.querySelector(".jp-Notebook-ExecutionIndicator[data-status='busy']") !== null"""
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage"]


def _require(ok: bool, why: str) -> None:
    if not ok:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why + " (`.ci/run` installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of notebook 08; yields its URL."""
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    settings = tmp_path / ".settings"
    for name, value in {"notebook-extension/tracker": {"windowingMode": "none"},  # every cell in the DOM
                        "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}
                        }.items():
        f = settings / "@jupyterlab" / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    port = _free_port()
    env = {**os.environ, "MINISD_QUICK": "1", "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / ".runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / ".config")}
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/api/status", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_notebook_08_explorer_in_a_real_browser(lab):
    _require(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "the playwright package is not installed")
    artifacts = Path(os.environ.get("MINISD_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1100})
        try:
            def run_all():
                page.locator(".lm-MenuBar-item", has_text="Run").first.click()
                page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

            page.goto(f"{lab}/lab/tree/{NOTEBOOK.name}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            page.wait_for_timeout(3000)  # the kernel connects ("connecting", then idle again)
            run_all()
            # every code cell has run: each prompt shows an execution count. Should JupyterLab ask
            # which kernel to use (it does when Run is pressed before the kernel is connected),
            # accept its choice and run again.
            # Once in a while Run All is dropped silently (seen here: the kernel idle, no cell run);
            # then nothing is queued or running after a few seconds, and it is pressed again.
            deadline, idle_since = time.time() + 240, None
            while not page.evaluate(ALL_RUN):
                dialog = page.locator(".jp-Dialog .jp-mod-accept")
                if dialog.count():
                    dialog.first.click()
                    page.wait_for_timeout(3000)
                    run_all()
                busy = page.evaluate(BUSY)
                idle_since = None if busy else (idle_since or time.time())
                if idle_since and time.time() - idle_since > 10:
                    run_all()
                    idle_since = None
                assert time.time() < deadline, "the notebook's cells did not all run within 240 s"
                page.wait_for_timeout(1000)
            errors = page.locator("[data-mime-type='application/vnd.jupyter.stderr']", has_text="Traceback")
            assert errors.count() == 0, errors.first.inner_text()

            explorer = page.locator(".minisd-explorer").last
            frame = explorer.locator("img.minisd-explorer-frame")
            frame.scroll_into_view_if_needed()
            frame.wait_for(state="visible", timeout=60_000)

            def changed_from(src: str, timeout=60_000):
                page.wait_for_function(
                    "(s) => { const i = [...document.querySelectorAll('.minisd-explorer img.minisd-explorer-frame')]"
                    ".pop(); return i && i.src && i.src !== s; }", arg=src, timeout=timeout)

            first_src, first = frame.get_attribute("src"), frame.screenshot()
            assert frame.evaluate("i => i.naturalWidth") > 400  # a drawn frame, not an empty image

            # type a prompt and press Run
            explorer.locator(".minisd-explorer-prompt input").fill("a small blue square in the top left")
            begin = time.perf_counter()
            explorer.locator("button.minisd-explorer-run").click()
            changed_from(first_src)
            timings = {"prompt typed, Run pressed → new picture on the page (s)": time.perf_counter() - begin}
            after_run_src, after_run = frame.get_attribute("src"), frame.screenshot()
            assert after_run != first

            # move the step slider from the end (Run shows the last step) to step 3, by typing into
            # its readout as a keyboard user would
            readout = explorer.locator(".minisd-explorer-step .widget-readout")
            assert int(readout.inner_text()) > 3
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("3")
            begin = time.perf_counter()
            page.keyboard.press("Enter")
            changed_from(after_run_src)
            timings["step typed into the slider → new picture on the page (s)"] = time.perf_counter() - begin
            # kept for the record (not asserted: speed is measured by `minisd bench`)
            (artifacts / "browser-timings.json").write_text(json.dumps(timings, indent=1))
            page.wait_for_timeout(300)
            after_slide = frame.screenshot()
            assert after_slide != after_run
            page.screenshot(path=str(artifacts / "explorer.png"), full_page=False)

            # an absurd step count: a message on the page, the picture stays
            steps = explorer.locator(".minisd-explorer-steps input")
            steps.fill("100000")
            steps.press("Enter")
            message = explorer.locator(".minisd-explorer-message")
            message.get_by_text("not allowed").wait_for(timeout=30_000)
            assert "100000" in message.inner_text() and "Traceback" not in message.inner_text()
            assert frame.screenshot() == after_slide
            explorer.screenshot(path=str(artifacts / "explorer-message.png"))
        except Exception:
            page.screenshot(path=str(artifacts / "explorer-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
