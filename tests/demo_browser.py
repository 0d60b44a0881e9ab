"""Drive guided-demo in a real headless Chromium: start the server, fill the page, read it back.

Used by tests/test_demo.py and scripts/demo_screenshot.py. Needs Debian's chromium and
chromium-driver (apt-get install chromium chromium-driver) and selenium; nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoServer:
    """`python -m guided.cli.demo ARGS --port P` in a child process, ready once the page answers."""

    def __init__(self, *args, tmp: Path, timeout=120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GRADIO_TEMP_DIR=str(tmp / "gradio"))
        self.log = open(tmp / "demo.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "guided.cli.demo", "--device", "cpu", "--port",
                                      str(self.port), *args], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"guided-demo did not come up:\n{self.output()}")
            time.sleep(0.5)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout=30) -> int:
        """SIGTERM, as a service manager stops it; the exit status (or -9 if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


def chromium(width=1280, height=1000):
    """A headless Chromium under the system's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager look for a browser online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def field(driver, elem_id: str, value) -> None:
    """Type `value` into the input of the page's component `elem_id`, replacing what is there."""
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", f"#{elem_id} input, #{elem_id} textarea")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    # a dropdown takes a typed value on Enter (which also closes its list), other fields on leaving them
    box.send_keys(str(value), Keys.ENTER if box.get_attribute("role") == "combobox" else Keys.TAB)


def text_of(driver, elem_id: str) -> str:
    """The text a component shows; for a Markdown one, its text alone (not the progress overlay's)."""
    found = driver.find_elements("css selector", f"#{elem_id} [data-testid='markdown']")
    return (found[0] if found else driver.find_element("id", elem_id)).text


def wait_for(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))


def generate(driver, timeout=120, **fields) -> str:
    """Fill the Generate tab's fields (by elem_id, '-' for '_'), press Generate and return the status
    line once the run has ended (a summary or an error)."""
    for name, value in fields.items():
        field(driver, name.replace("_", "-"), value)
    before = text_of(driver, "status")
    driver.find_element("id", "generate").click()

    def finished(d):
        now = text_of(d, "status")
        return now if now != before and now and not now.startswith("sampling") else False
    status = wait_for(driver, finished, timeout)
    wait_for(driver, lambda d: d.execute_script(  # and the images it came with have loaded
        "return [...document.querySelectorAll('#samples img, #previews img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"), timeout)
    return status


def image(driver, elem_id: str):
    """The PIL image the component `elem_id` shows, fetched from the page's own server."""
    import io

    from PIL import Image

    src = driver.find_element("css selector", f"#{elem_id} img").get_attribute("src")
    with urllib.request.urlopen(src, timeout=10) as r:
        return Image.open(io.BytesIO(r.read())).copy()
