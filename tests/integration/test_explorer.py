"""The explorer page in a real browser: headless Chromium (Debian's package) driven by Selenium against a uvicorn
server on loopback. Skips, saying why, only when the browser cannot be found or started (.ci/run installs it)."""

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from tests.unit.serving.test_service import running, train_tiny

from pmmrec import Recommender
from pmmrec.serving.app import create_app

pytestmark = pytest.mark.slow

K = 5
USER = "tau2"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1500"]


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does "
                    "it): the explorer's browser tests cannot run")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[dev]')")
    from selenium.common.exceptions import WebDriverException

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path_factory.getbasetemp())
    options.add_argument(f"--user-data-dir={profile}")
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    except WebDriverException as e:
        pytest.skip(f"headless Chromium is installed but does not start: {str(e).splitlines()[0]}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(quick_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("explorer")
    a = Recommender.from_checkpoint(train_tiny(quick_world / "target", run / "a", "seed=42"))
    b = Recommender.from_checkpoint(train_tiny(quick_world / "target", run / "b", "seed=7"))
    app = create_app(a, compare=b, names=("model A", "model B"))
    with running(app) as url:
        yield url, a, b


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _wait(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def _loaded_images(driver, selector: str) -> list[int]:
    """naturalWidth of every image under ``selector`` once all have finished loading (0 = broken)."""
    script = ("const imgs = [...document.querySelectorAll(arguments[0])];"
              "return imgs.every(i => i.complete) ? imgs.map(i => i.naturalWidth) : null;")
    return _wait(driver, lambda d: d.execute_script(script, selector))


def _screenshot(driver, path: Path) -> None:
    """The page from the top, kept as a test artifact (under pytest's temporary folder)."""
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def _columns(driver) -> dict[str, list[str]]:
    """Each model column's item ids, read in one script (the page may re-render between two element reads)."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#columns section.column')].map(c => "
        "[c.dataset.model, [...c.querySelectorAll('li.card')].map(x => x.dataset.item)]));")


def test_pick_a_user_and_see_history_next_item_and_both_top_k(browser, server, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, a, b = server
    browser.get(url + "/")
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    assert "model A" in browser.find_element(By.ID, "served").text
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys(str(K))
    query = browser.find_element(By.ID, "user-query")
    query.send_keys(USER, Keys.ENTER)  # the keyboard alone: search, then open the user
    button = _wait(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f'#user-results li:first-child button[data-user="{USER}"]'))  # the exact id comes first
    button.send_keys(Keys.ENTER)
    _wait(browser, lambda d: d.find_element(By.ID, "user-id").text == USER)

    full = a.domain.joinpath("users.tsv").read_text().split(f"\n{USER}\t")[1].split("\n")[0].split()
    seen, held_out = full[:-1], full[-1]
    history = [x.get_attribute("data-item") for x in browser.find_elements(By.CSS_SELECTOR, "#history li.card")]
    assert history == seen
    assert browser.find_element(By.CSS_SELECTOR, "#next li.card").get_attribute("data-item") == held_out
    columns = _columns(browser)
    assert columns == {"model A": [r.item_id for r in a.recommend(seen, k=K)],
                       "model B": [r.item_id for r in b.recommend(seen, k=K)]}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#columns li.card img")) == 2 * K
    widths = _loaded_images(browser, "#columns li.card img, #history li.card img, #next li.card img")
    assert len(widths) == 2 * K + len(seen) + 1 and all(w > 0 for w in widths), widths
    for name, items in columns.items():  # hits are marked exactly where the held-out item is
        marked = [x.get_attribute("data-item") for x in browser.find_elements(
            By.CSS_SELECTOR, f'#columns section[data-model="{name}"] li.card.hit')]
        assert marked == [i for i in items if i == held_out]
    _screenshot(browser, artifacts / "explorer-user.png")

    browser.find_element(By.ID, "exclude-history").click()  # toggles re-rank at once
    _wait(browser, lambda d: _columns(d)["model A"] == [r.item_id for r in a.recommend(seen, k=K,
                                                                                       exclude_history=False)])
    users = {line.split("\t")[0] for line in a.domain.joinpath("users.tsv").read_text().splitlines()[1:]}
    browser.execute_script("document.getElementById('user-id').textContent = ''")
    browser.find_element(By.ID, "random-user").click()
    _wait(browser, lambda d: d.find_element(By.ID, "user-id").text in users)

    browser.set_window_size(390, 900)  # a phone: one column, and nothing wider than the screen
    try:
        _wait(browser, lambda d: d.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"), timeout=5)
    finally:
        browser.set_window_size(1280, 1500)


def test_add_an_item_and_see_which_users_it_reaches(browser, server, artifacts, tmp_path):
    from selenium.webdriver.common.by import By

    url, a, b = server
    browser.get(url + "/")
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    with httpx.Client(base_url=url, timeout=30) as client:
        top = client.get(f"/users/{USER}", params={"k": K}).json()["models"][0]["items"][0]
        image = client.get(f"/items/{top['item_id']}/image").content
    # A twin of the user's best item under model A (same image and title) must land in that user's top K there.
    upload = tmp_path / "twin.png"
    upload.write_bytes(image)
    browser.find_element(By.ID, "new-image").send_keys(str(upload))
    browser.find_element(By.ID, "new-title").send_keys(top["title"])
    browser.find_element(By.ID, "new-id").send_keys("browser_twin")
    browser.find_element(By.ID, "add-button").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#reach li.card[data-item="browser_twin"] img'))
    assert _loaded_images(browser, "#reach li.card img") == [_image_width(image)]
    assert a.item_image("browser_twin") == image and b.item("browser_twin") is not None
    with httpx.Client(base_url=url, timeout=30) as client:
        reach = client.get("/items/browser_twin/reach", params={"k": 10}).json()  # the page's K
    for column in reach["models"]:  # each model's list on the page is the API's answer
        shown = browser.find_elements(By.CSS_SELECTOR,
                                      f'#reach section[data-model="{column["name"]}"] button[data-user]')
        assert [r.get_attribute("data-user") for r in shown] == [u["user_id"] for u in column["users"]]
    assert USER in [u["user_id"] for u in reach["models"][0]["users"]]
    browser.find_element(By.CSS_SELECTOR, f'#reach section[data-model="model A"] button[data-user="{USER}"]').click()
    card = _wait(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, '#columns section[data-model="model A"] li.card.added[data-item="browser_twin"]'))
    assert "new item" in card.text
    assert all(w > 0 for w in _loaded_images(browser, "#columns li.card img"))
    _screenshot(browser, artifacts / "explorer-added.png")
    assert (artifacts / "explorer-added.png").stat().st_size > 10_000


def _image_width(data: bytes) -> int:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).width
