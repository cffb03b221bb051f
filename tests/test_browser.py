"""Notebook 02 in a real JupyterLab, driven by a real browser: run all cells, click the editor's
Generate button, and wait for the <video> it shows; the prompt coach's badges are on the page.

JupyterLab runs headless on 127.0.0.1 (a free port, token auth, a scratch root holding a copy of
the notebook and the data files); Debian's chromium is driven by Playwright, which is never
allowed to download a browser. The kernel runs the tiny model in fast mode (32x48, 3 chunks).
A screenshot goes to $MEMFLOW_NB_ARTIFACTS (default tests/artifacts/browser_notebook02.png).
"""
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from jupyter_env import kernel_env

ROOT = Path(__file__).parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_prompt_timeline.ipynb"
N_CODE_CELLS = sum(c["cell_type"] == "code" for c in json.loads(NOTEBOOK.read_text())["cells"])
CHROMIUM = os.environ.get("MEMFLOW_NB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# JupyterLab user settings for the run: every cell stays in the page (no virtual scrolling, so
# all prompts can be read), the notebook's kernel starts without a "Select Kernel" question, and
# no news or update checks (nothing leaves the machine).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none",
                                                                   "autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    """Poll `predicate` until it returns something truthy, for at most `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of notebook 02; yields (base url, token)."""
    root = tmp_path / "root"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, root / "notebooks")
    shutil.copytree(ROOT / "data", root / "data")  # the example and the prompt coach's bad example
    settings = tmp_path / "lab-settings"
    for rel, value in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(value))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, **kernel_env(tmp_path),
           "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    env.pop("MPLBACKEND", None)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up():
        assert server.poll() is None, f"jupyterlab exited:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(up, 90, "JupyterLab to answer")
        yield base, token, tmp_path
    finally:
        # Ask the server to shut down (it stops its kernels too); kill it if it does not.
        try:
            req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=5).close()
        except OSError:
            pass
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def artifact_path() -> Path:
    folder = Path(os.environ.get("MEMFLOW_NB_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "browser_notebook02.png"


@pytest.mark.slow
def test_notebook_02_generates_a_video_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"no chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)"
    base, token, tmp_path = lab
    shot = artifact_path()
    console = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/notebooks/02_prompt_timeline.ipynb?token={token}")
            page.locator(".jp-Notebook .jp-CodeCell").first.wait_for()

            def accept_kernel_dialog():
                # JupyterLab may ask which kernel to start; the preselected one is the venv's python3.
                dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
                if dialog.count() and dialog.first.is_visible():
                    dialog.locator("button.jp-mod-accept").click()

            def kernel_connected():
                # The page's indicator can say idle before its websocket is up; the server knows.
                accept_kernel_dialog()
                with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=5) as r:
                    kernels = json.load(r)
                return any(k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels)

            wait_for(kernel_connected, 90, "the notebook's kernel to start and connect")
            prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt")
            wait_for(lambda: prompts.count() == N_CODE_CELLS, 30, f"{N_CODE_CELLS} code cells on the page")

            def run_all():
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

            def started():
                accept_kernel_dialog()
                return re.search(r"\[(\*|\d+)\]", prompts.first.inner_text())

            run_all()
            try:
                wait_for(started, 20, "the first cell to start")
            except AssertionError:
                # The kernel was not attached to the page yet when Run All came: JupyterLab then
                # skips the cells. That is a start-up race in the page, not in the notebook.
                print("Run All started nothing; running all cells again")
                run_all()
                wait_for(started, 20, "the first cell to start (second Run All)")

            def all_ran():
                accept_kernel_dialog()
                texts = prompts.all_inner_texts()
                return all(re.fullmatch(r"\s*\[\d+\]:\s*", t) for t in texts)

            wait_for(all_ran, 180, "every cell of notebook 02 to run")
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert errors.count() == 0, "a cell failed:\n" + "\n".join(errors.all_inner_texts())[-3000:]

            # The prompt coach's badges: the example file rewords its keeper in segments 2 and 3.
            badges = page.locator(".jp-Notebook .memflow-coach-badge")
            wait_for(lambda: badges.count() == 2, 30, "two prompt-coach badges in the editor")
            badges.first.scroll_into_view_if_needed()
            assert badges.first.is_visible() and badges.first.inner_text().strip() == "prompt coach: 1 warning"
            tooltip = page.locator(".jp-Notebook .memflow-coach summary").first.get_attribute("title") or ""
            assert "description_drift" in tooltip

            generate = page.locator("button.memflow-generate")
            generate.wait_for(state="visible")
            assert page.locator(".jp-Notebook video").count() == 0  # nothing made before the click
            generate.scroll_into_view_if_needed()
            generate.click()

            video = page.locator(".jp-Notebook video").first
            video.wait_for(state="attached", timeout=180_000)
            page.get_by_text(re.compile(r"done: 3 chunks")).wait_for(timeout=30_000)
            video.scroll_into_view_if_needed()
            time.sleep(1.0)  # let the first frame paint before the screenshot
            page.screenshot(path=str(shot))

            assert page.locator(".jp-Notebook video").count() >= 1
            src = video.locator("source").first.get_attribute("src") or video.get_attribute("src") or ""
            assert src.startswith("data:video/mp4;base64,")
            # The live preview showed the last chunk's frame, as a PNG.
            assert (page.locator(".jp-Notebook img[src^='blob:'], .jp-Notebook img[src^='data:image/png']")
                    .count() >= 1)

            # Stop reaches the kernel while it generates (generation runs in a thread). A long run:
            # the whole 43-chunk timeline at 128x224, about a second per chunk on a CPU.
            for label, value in (("height", "128"), ("width", "224"), ("max chunks", "0")):
                field = page.locator(".widget-inline-hbox", has=page.locator("label", has_text=re.compile(
                    f"^{label}$"))).locator("input")
                field.fill(value)
                field.press("Enter")
            generate.click()
            page.get_by_text(re.compile(r"chunk \d+/43,")).wait_for(timeout=120_000)
            page.locator("button", has_text=re.compile(r"^\s*Stop\s*$")).click()
            stopped = page.get_by_text(re.compile(r"stopped after (\d+) of 43 chunks"))
            stopped.wait_for(timeout=120_000)
            text = stopped.inner_text()
            made = int(re.search(r"stopped after (\d+) of", text).group(1))
            assert 1 <= made < 43 and "at 128x224" in text
            assert page.locator(".jp-Notebook video").count() >= 1
        except Exception:
            page.screenshot(path=str(shot.with_name("browser_notebook02_failure.png")))
            print("\n".join(console[-40:]))
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
