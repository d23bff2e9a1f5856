"""The studio in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium)
labels pairs and steps with clicks and keys, sees hostile model text inert, and the written JSONL trains
`llmrl rm` and `llmrl prm` for one step on the tiny model. Skips, saying why, where there is no chromium."""

import json
import shutil

import pytest

from llmrl.cli import main
from run_folders import write_run
from studio_proc import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no chromium/chromedriver (apt-get install chromium chromium-driver; "
                                       ".ci/run and scripts/setup.sh do when root)")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1300,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=30):
    """Poll `condition` until true; an element the page replaced while it was read (a reload after a submit) is
    read again on the next poll, not an error."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def press(driver, key: str, old_key: str | None = None):
    """Send one key to the page; wait for the next item when the key submits."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()
    if old_key is not None:
        wait_for(driver, lambda d: d.execute_script(
            "var f = document.querySelector('form[data-key]'); return document.body.dataset.ready === '1' && "
            "(!f || f.dataset.key !== arguments[0]);", old_key))


def current_key(driver) -> str:
    return driver.find_element("css selector", "form[data-key]").get_attribute("data-key")


def click_and_wait(driver, css: str):
    key = current_key(driver)
    driver.find_element("css selector", css).click()
    wait_for(driver, lambda d: d.execute_script(
        "var f = document.querySelector('form[data-key]'); return document.body.dataset.ready === '1' && "
        "(!f || f.dataset.key !== arguments[0]);", key))


def test_label_in_a_browser_then_train_rm_and_prm(browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.keys import Keys

    run = write_run(tmp_path / "run", hacked=True)
    labels = tmp_path / "labels"
    server = Server(str(run), "--labels", str(labels), "--labeller", "ci")
    try:
        d = browser
        d.get(server.url)
        wait_for(d, lambda d: d.execute_script("return document.body.dataset.ready") == "1")
        box = d.find_element("id", "labeller-input")
        box.clear()
        box.send_keys("ann")
        d.find_element("id", "labeller-save").click()
        wait_for(d, lambda d: d.find_element("id", "labeller").text == "ann")

        # rollouts: hostile text stays text, long lines wrap inside the page
        d.get(server.url.split("?")[0] + "run/0?step=1")
        wait_for(d, lambda d: d.execute_script("return document.body.dataset.ready") == "1")
        with pytest.raises(NoAlertPresentException):
            d.switch_to.alert.text
        shown = d.find_element("css selector", ".toks").text.replace("\n", "")
        assert "<script>alert('pwned')</script>" in shown.replace("·", " ") and "\\x1b[31mred\\x1b[0m" in shown
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")

        # preference pairs: a key, a click, the arrow key, tie
        d.find_element("id", "nav-pairs").click()
        wait_for(d, lambda d: d.find_elements("css selector", "form[data-key]"))
        keys = []
        for action in ("a", "#choose-b", Keys.ARROW_RIGHT, "t"):
            keys.append(current_key(d))
            click_and_wait(d, action) if action.startswith("#") else press(d, action, keys[-1])
        assert "Saved." in d.find_element("id", "flash").text

        # a second tab on the same item: the first tab's label stands, the second writes nothing
        d.switch_to.new_window("tab")
        d.get(server.url.split("?")[0] + "pairs")
        shared = current_key(d)
        press(d, "b", shared)
        d.switch_to.window(d.window_handles[0])
        d.get(server.url.split("?")[0] + f"pairs?after={keys[-1]}")       # the stale page that tab still had open
        assert current_key(d) != shared
        status, headers, _ = server.request("POST", "/pairs", form={"key": shared, "choice": "a"})
        assert headers["Location"].endswith("msg=duplicate")

        # step labels: keys g / n / x move down the steps, Enter saves; then clicks
        d.find_element("id", "nav-steps").click()
        wait_for(d, lambda d: d.find_elements("css selector", "form[data-key]"))
        press(d, "s", current_key(d))                                       # skip the hostile blob
        for _ in range(2):
            n = len(d.find_elements("css selector", ".step"))
            for i in range(n):
                press(d, "gnx"[i % 3])
            press(d, Keys.ENTER, current_key(d))
        n = len(d.find_elements("css selector", ".step"))
        for i in range(n):
            d.find_element("id", f"step-{i}-{'good' if i < n - 1 else 'bad'}").click()
        click_and_wait(d, "#save-steps")
    finally:
        server.kill()

    pairs = [json.loads(x) for x in (labels / "pairs.jsonl").read_text().splitlines()]
    ties = [json.loads(x) for x in (labels / "ties.jsonl").read_text().splitlines()]
    steps = [json.loads(x) for x in (labels / "step_labels.jsonl").read_text().splitlines()]
    assert [p["key"] for p in pairs] == keys[:3] + [shared] and [t["key"] for t in ties] == [keys[3]]
    assert {p["labeller"] for p in pairs + ties + steps} == {"ann"}
    assert len(steps) == 3 and steps[0]["labels"][:3] == [1.0, 0.5, 0.0] and steps[2]["labels"][-1] == 0.0

    common = ["model.name=tiny", "model.autocast=none", "run.steps=1", "run.progress=false",
              f"run.output_dir={tmp_path / 'out'}"]
    assert main(["rm", *common, "run.name=rm", f"preference.data_path={labels / 'pairs.jsonl'}",
                 "preference.heldout_fraction=0.25", "preference.batch_size=2"]) == 0
    assert (tmp_path / "out" / "rm" / "final").is_dir()
    assert main(["prm", *common, "run.name=prm", f"prm.data_path={labels / 'step_labels.jsonl'}",
                 "prm.heldout_fraction=0.3", "prm.batch_size=2"]) == 0
    assert (tmp_path / "out" / "prm" / "final").is_dir()
