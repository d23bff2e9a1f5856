"""Screenshots of the four studio views for the README: docs/figures/studio_{rollouts,pairs,steps,audit}.png.

    .venv/bin/python scripts/studio_screenshots.py [RUN_DIR ...]

Starts `llmrl studio` on the given run folders plus a synthetic run that games a length reward (tests/run_folders.py),
opens each view in headless Chromium (system `chromium` + `chromium-driver`, via selenium), and saves a PNG of the
viewport, reduced to a 256-colour palette with Pillow when it is installed so each file stays small.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "studio")]

from run_folders import write_run  # noqa: E402
from studio_proc import Server  # noqa: E402


def save(driver, out: Path) -> None:
    driver.save_screenshot(str(out))
    try:
        from PIL import Image
    except ImportError:
        return
    img = Image.open(out).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KB")


def main(run_dirs: list[str]) -> None:
    from selenium import webdriver

    tmp = Path(tempfile.mkdtemp())
    hacked = write_run(tmp / "length_hack_synthetic", hacked=True)
    server = Server(*run_dirs, str(hacked), "--labels", str(tmp / "labels"), "--labeller", "ann")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--window-size=1280,800", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))
    base, figs = server.url.split("?")[0], ROOT / "docs" / "figures"
    last = len(run_dirs)                                    # the synthetic run's index
    try:
        driver.get(server.url)
        views = {"rollouts": "run/0" if run_dirs else "run/0?step=5", "pairs": "pairs", "steps": "steps",
                 "audit": "audit"}
        for name, path in views.items():
            driver.get(base + path)
            if name == "steps":                      # a short response with several steps, two already marked
                for _ in range(200):
                    texts = [e.text for e in driver.find_elements("css selector", ".step pre")]
                    if len(texts) >= 3 and sum(map(len, texts)) < 400:
                        break
                    driver.find_element("id", "skip").click()
                for i, mark in enumerate(("good", "good")):
                    driver.find_element("id", f"step-{i}-{mark}").click()
            if name == "audit" and run_dirs:
                driver.execute_script(f"document.querySelectorAll('.run-audit')[{last}].scrollIntoView()")
            save(driver, figs / f"studio_{name}.png")
    finally:
        driver.quit()
        server.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
