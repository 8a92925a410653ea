"""The market page in a real headless browser (Debian's chromium and chromium-driver, driven by Selenium): sign in,
publish a file with the page's progress bar, ask from the catalogue and watch the streamed answer and the cached
token count, see the publisher's revenue change after another agent's read, and check that a second tenant cannot
see a private document. Skipped where the browser is not installed, failed for that under CI (`.ci/run` installs it;
tests/service_support.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from server_support import LiveServer
from service_support import import_or_missing
from web_support import browser_binaries

from kvmart.reuse.samples import sample_text

pytestmark = pytest.mark.browser
WAIT_SECONDS = 60  # a deadline against hangs, not a timing
MODEL = "builtin:tiny"


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = browser_binaries()
    webdriver = import_or_missing("selenium.webdriver", "selenium is not installed (the test extras)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000", "--disable-extensions"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("web-browser")) as server:
        yield server


class Page:
    """Small helpers over the driver: find by id, wait for a condition."""

    def __init__(self, driver, base_url: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.base_url, self.by = driver, base_url, By
        self.wait = WebDriverWait(driver, WAIT_SECONDS)

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def id(self, element_id: str):
        return self.driver.find_element(self.by.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.id(element_id).text

    def until_visible(self, element_id: str):
        return self.wait.until(lambda d: (e := d.find_element(self.by.ID, element_id)).is_displayed() and e)

    def sign_in(self, key: str) -> None:
        self.open("/signin")
        self.id("api-key").send_keys(key)
        self.id("signin-button").click()
        self.wait.until(lambda d: "/signin" not in d.current_url)

    def sign_out(self) -> None:
        self.driver.find_element(self.by.CSS_SELECTOR, "form[action='/signout'] button").click()
        self.wait.until(lambda d: not d.find_elements(self.by.ID, "signed-in-as"))

    def publish_file(self, path: str, title: str, licence: str = "public", readers: str = "") -> str:
        """Publish through the form (the file read by the page); the new document's id."""
        from selenium.webdriver.support.ui import Select

        self.open("/publisher")
        self.id("publish-file").send_keys(path)
        self.wait.until(lambda d: d.find_element(self.by.ID, "publish-text").get_attribute("value"))
        self.id("publish-title").clear()
        self.id("publish-title").send_keys(title)
        Select(self.id("publish-licence")).select_by_value(licence)
        if readers:
            self.id("publish-readers").send_keys(readers)
        self.id("publish-button").click()
        link = self.until_visible("published-link")
        return link.get_attribute("href").rsplit("/", 1)[1]


def test_publish_ask_and_earn_in_a_browser(driver, live, tmp_path):
    page = Page(driver, live.url)
    document = tmp_path / "licence-notes.txt"
    document.write_text("Browser notes.\n\n" + sample_text("bsd-3-clause"))
    page.sign_in(live.publisher_key)
    assert driver.current_url.endswith("/publisher") and page.text("signed-in-as").startswith("publisher")
    doc_id = page.publish_file(str(document), "Licence notes")
    assert "Published Licence notes" in page.text("publish-result")
    stored = live.http.get(f"/v1/documents/{doc_id}").json()
    assert stored["title"] == "Licence notes" and stored["source"] == "licence-notes.txt"

    page.open("/")  # ask from the catalogue
    driver.find_element(page.by.CSS_SELECTOR, f"tr[data-doc='{doc_id}'] a.title").click()
    page.id("question").send_keys("Who holds the copyright?")
    page.id("ask-button").click()
    page.until_visible("ask-usage")
    assert page.text("cached-tokens").startswith(f"{stored['num_tokens']:,} tokens")
    api = live.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Who holds the copyright?"}], "max_tokens": 32,
        "temperature": 0, "documents": [doc_id]}).json()
    assert page.id("answer").get_attribute("textContent") == api["choices"][0]["message"]["content"]
    assert page.text("charged").startswith("$")

    page.open("/publisher")
    before = Decimal(page.text("revenue").lstrip("$"))
    reader = live.account("browser-reader", "agent")
    read = live.http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {reader}"}, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Which clauses?"}], "max_tokens": 4,
        "temperature": 0, "documents": [doc_id]}).json()
    page.open("/publisher")
    after = Decimal(page.text("revenue").lstrip("$"))
    assert after - before == Decimal(read["usage"]["kvmart"]["charge"]["usd"])
    page.sign_out()


def test_a_second_tenant_cannot_see_a_private_document(driver, live, tmp_path):
    page = Page(driver, live.url)
    memo = tmp_path / "memo.txt"
    memo.write_text("Private memo.\n\n" + sample_text("mpl-2.0"))
    page.sign_in(live.account("tenant-a", "publisher"))
    doc_id = page.publish_file(str(memo), "Tenant A merger memo", licence="private")
    page.open("/")
    assert "Tenant A merger memo" in page.text("catalogue")
    page.sign_out()
    page.sign_in(live.account("tenant-b", "publisher"))
    for path in ("/", "/?q=merger", "/publisher"):
        page.open(path)
        assert "merger memo" not in driver.page_source and doc_id not in driver.page_source
    page.open(f"/documents/{doc_id}")
    assert page.text("error-message").startswith(f"document '{doc_id}' not found")
    page.sign_out()
