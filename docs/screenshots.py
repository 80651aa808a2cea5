"""Screenshots of the MLflow runs page and of a report, as the README shows them.

    pip install playwright            # uses the system Chromium: apt-get install chromium
    python docs/screenshots.py --store mlruns --report reports/patchcore/report.html --out docs

Starts `mlflow ui` on 127.0.0.1 over the given store, opens the experiment's runs table with
every sweep expanded, and shoots it; then shoots the report's first screen, its full page and
its first run's section (operating point, decision rates, figures).
Not part of the test suite: it needs a browser.
"""

import argparse
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from patchlab.artifacts.store import runs_view_url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow ui at {url} did not answer within {seconds} s")


def shoot_runs(page: Page, url: str, experiment_id: str, out: Path) -> None:
    """The runs table in patchlab's saved view, every sweep expanded, the assistant closed."""
    page.goto(runs_view_url(url, experiment_id))
    page.wait_for_selector("text=sweep", timeout=60_000)
    page.wait_for_timeout(2_000)
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    expanders = page.locator("[col-id='attributes.`Run Name`'] button")
    for index in range(expanders.count()):
        expanders.nth(index).click()
        page.wait_for_timeout(300)
    page.wait_for_timeout(1_500)
    page.screenshot(path=str(out / "mlflow_runs.png"))


def shoot_run_section(page: Page, out: Path) -> None:
    """The report's first run: its operating point, decision rates and first figures."""
    heading = page.locator("h2:has(+ p > a)").first
    box = heading.bounding_box()
    width = page.viewport_size["width"]
    clip = {"x": 0, "y": box["y"] - 8, "width": width, "height": 1500}
    page.screenshot(path=str(out / "report_run.png"), full_page=True, clip=clip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, default=Path("mlruns"))
    parser.add_argument("--experiment-id", default="1")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--browser", default="/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = f"sqlite:///{(args.store / 'mlflow.db').resolve()}"
    command = [shutil.which("mlflow") or "mlflow", "ui", "--backend-store-uri", store]
    server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)])
    try:
        wait_for(url)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.browser)
            page = browser.new_page(viewport={"width": 1800, "height": 900})
            shoot_runs(page, url, args.experiment_id, args.out)
            page.goto(args.report.resolve().as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(args.out / "report.png"))
            page.screenshot(path=str(args.out / "report_full.png"), full_page=True)
            shoot_run_section(page, args.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
