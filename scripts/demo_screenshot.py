"""Regenerate docs/demo.png: a screenshot of the running guided-demo page after one generate.

    OMP_NUM_THREADS=1 python scripts/demo_screenshot.py [--out docs/demo.png] [demo flags...]

Starts `python -m guided.cli.demo` on a free local port (the shipped digits models unless demo flags
say otherwise), presses Generate for class 3 at classifier-guidance scale 4 in headless Chromium
(Debian's chromium + chromium-driver), saves the screenshot and stops the server.
"""
import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import demo_browser as web  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "demo.png"))
    args, demo_flags = p.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = web.DemoServer(*demo_flags, tmp=Path(tmp))
        driver = None
        try:
            driver = web.chromium(1280, 1000)
            driver.get(server.url)
            web.wait_for(driver, lambda d: d.find_elements("id", "generate"))
            print(web.generate(driver, **{"class": 3, "scale": 4}))
            driver.save_screenshot(args.out)
        finally:
            if driver is not None:
                driver.quit()
            server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
