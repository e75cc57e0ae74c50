"""The demo page in a real headless browser (Debian's chromium and chromium-driver, driven by
selenium) against the API served by uvicorn: upload an image and get its caption, ask a
question, type a Chinese prompt and get pictures."""

import shutil
import socket
import threading
import time

import pytest
from http_utils import b64, post

INSTALL = "apt-get install -y chromium chromium-driver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason=f"no chromium / chromedriver here; install: {INSTALL}"
  ),
]


@pytest.fixture(scope="module")
def url(app):
  """The app served by uvicorn on a free port of localhost, in a thread."""
  import uvicorn

  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
  server.should_exit = True
  thread.join(30)


@pytest.fixture(scope="module")
def browser():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(DRIVER), options=options)
  yield driver
  driver.quit()


def _wait_for(driver, condition, timeout=60):
  from selenium.webdriver.support.ui import WebDriverWait

  return WebDriverWait(driver, timeout).until(condition)


def _output(driver, element_id):
  """The text of an output once it is neither empty nor the '...' of a request under way."""

  def done(d):
    text = d.find_element("id", element_id).text
    return text if text and text != "..." else False

  return _wait_for(driver, done)


def test_caption_question_and_drawing_in_a_browser(url, browser, app, scene_files):
  browser.get(url)
  _wait_for(browser, lambda d: "parameters" in d.find_element("id", "model").text)
  browser.find_element("id", "image-file").send_keys(scene_files[2])
  browser.find_element("id", "describe").click()
  caption = _output(browser, "describe-output")
  want = post(app, "/v1/caption", json={"image": b64(scene_files[2])}).json()["output"]
  assert caption == want.strip()

  browser.find_element("id", "question").send_keys("圆形是什么颜色的？")
  browser.find_element("id", "describe").click()
  _wait_for(browser, lambda d: d.find_element("id", "describe-output").text != caption)
  body = {"image": b64(scene_files[2]), "question": "圆形是什么颜色的？"}
  want = post(app, "/v1/answer", json=body).json()["output"]
  assert _output(browser, "describe-output") == want.strip()

  browser.find_element("id", "draw-prompt").send_keys("中间有一个大的红色圆形。")
  browser.find_element("id", "num-images").clear()
  browser.find_element("id", "num-images").send_keys("3")
  browser.find_element("id", "draw").click()
  assert _output(browser, "draw-output").startswith("3 image(s), seed 0")
  images = browser.find_elements("css selector", "#images img")
  assert len(images) == 3
  assert all(browser.execute_script("return arguments[0].naturalWidth", i) == 48 for i in images)
  assert images[0].get_attribute("alt") == "中间有一个大的红色圆形。"

  browser.find_element("id", "continue-prompt").send_keys("")
  browser.find_element("id", "continue").click()  # an empty prompt: the page shows the error
  assert _output(browser, "continue-output").startswith("error: prompt: is empty")
