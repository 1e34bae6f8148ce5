"""The playground page of `fastdiff serve` in a real browser (Debian's chromium, headless, through
its chromedriver): the page loads the models, a prompt submitted shows an image with its UNet
calls, and bad input shows the service's error. The API runs in-process (uvicorn on loopback)."""

import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture(scope="module")
def url():
    import fastdiff
    from fastdiff.serving.api import Limits, LocalBackend, make_app
    from fastdiff.serving.runner import ModelRunner

    app = make_app(
        LocalBackend([ModelRunner(fastdiff.build_engine("tiny-shapes", device="cpu"))]), Limits(max_steps=20)
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting in the browser")


def test_the_page_samples_an_image_and_shows_errors(url, browser):
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    assert browser.title == "fastdiff playground"
    find = browser.find_element
    _wait(lambda: find(By.ID, "model").get_attribute("value") == "tiny-shapes")
    samplers = [o.get_attribute("value") for o in find(By.ID, "sampler").find_elements(By.TAG_NAME, "option")]
    assert "auto" in samplers and "olss" in samplers
    find(By.ID, "steps").clear()
    find(By.ID, "steps").send_keys("4")
    find(By.ID, "seed").send_keys("3")
    assert not find(By.ID, "result").is_displayed()  # nothing shown before a request
    find(By.ID, "go").click()
    _wait(lambda: find(By.ID, "result").is_displayed())
    src = find(By.ID, "image").get_attribute("src")
    assert src.startswith("data:image/png;base64,") and len(src) > 100
    assert _wait(lambda: browser.execute_script("return document.getElementById('image').naturalWidth")) > 0
    facts = find(By.ID, "facts").text
    assert "UNet calls" in facts and "4" in facts and "seed" in facts
    assert find(By.ID, "error").text == ""
    # bad input: steps over the cap -> the service's message on the page
    find(By.ID, "steps").clear()
    find(By.ID, "steps").send_keys("500")
    find(By.ID, "go").click()
    message = _wait(lambda: find(By.ID, "error").text)
    assert "steps must be between 1 and 20" in message
