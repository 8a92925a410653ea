"""The market page in a real headless browser (Debian's chromium and chromium-driver, driven by Selenium): sign in,
publish a file with the page's progress bar, ask from the catalogue and watch the streamed answer and the cached
token count, see the publisher's revenue change after another agent's read, and check that a second tenant cannot
see a private document. Skipped where the browser is not installed, failed for that under CI (`.ci/run` installs it;
tests/service_support.py)."""

from __future__ import annotations

import re
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

    def publish_file(self, path: str, title: str, licence: str = "public", readers: str = "",
                     open_page: bool = True) -> str:
        """Publish through the form (the file read by the page, opened first unless `open_page` is False); the new
        document's id."""
        from selenium.webdriver.support.ui import Select

        if open_page:
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


def test_try_it_shows_a_waiting_state_at_once_then_the_time_to_first_token(driver, live):
    page = Page(driver, live.url)
    doc_id = live.publish(sample_text("apache-2.0"), title="Apache for try-it").json()["id"]
    page.sign_in(live.account("try-it-reader", "agent"))
    page.open(f"/documents/{doc_id}")
    driver.execute_script("window.fetch = () => new Promise(() => {});")  # an answer that never starts
    page.id("question").send_keys("What is this license called?")
    page.id("ask-button").click()
    status = page.until_visible("ask-status")
    assert status.text == "Waiting for the first token…"
    assert page.id("answer").is_displayed() and "streaming" in page.id("answer").get_attribute("class")
    assert not page.id("ask-button").is_enabled()

    page.open(f"/documents/{doc_id}")  # now for real
    page.id("question").send_keys("What is this license called?")
    page.id("ask-button").click()
    page.until_visible("ask-usage")
    assert re.fullmatch(r"First token after \d+\.\d+ s · answer complete in \d+\.\d+ s", page.text("ask-status"))
    assert re.fullmatch(r"\d+\.\d+ s", page.text("time-saved"))  # seconds, as every page writes them
    page.sign_out()


def test_publishing_refreshes_the_list_tiles_and_form(driver, live, tmp_path):
    page = Page(driver, live.url)
    notes = tmp_path / "refresh-notes.txt"
    notes.write_text("Refresh notes.\n\n" + sample_text("mpl-2.0")[:3000])
    page.sign_in(live.account("refresher", "publisher"))
    page.open("/publisher")
    before = Decimal(page.text("balance").lstrip("$"))
    driver.execute_script("window.kvmartSamePage = true;")  # gone if the page were reloaded
    doc_id = page.publish_file(str(notes), "Refresh notes", open_page=False)
    assert driver.execute_script("return window.kvmartSamePage === true;")
    rows = driver.find_elements(page.by.CSS_SELECTOR, f"#my-documents tr[data-doc='{doc_id}']")
    assert len(rows) == 1 and "Refresh notes" in rows[0].text
    fee = Decimal(re.search(r"precompute fee \$([0-9]+\.[0-9]+)", page.text("publish-result")).group(1))
    assert fee > 0 and Decimal(page.text("balance").lstrip("$")) == before - fee
    for field in ("publish-title", "publish-text", "publish-source", "publish-price", "publish-readers"):
        assert page.id(field).get_attribute("value") == "", field
    page.sign_out()


def test_provider_p95_beyond_the_largest_bucket_reads_greater_than(driver, live):
    from kvmart.server.metrics import SECONDS_BUCKETS

    page = Page(driver, live.url)
    top = SECONDS_BUCKETS[-1]
    for _ in range(3):  # every one of them longer than the largest finite bucket
        live.services.metrics.request_seconds.observe(2 * top, endpoint="/v1/responses")
    page.sign_in(live.services.ledger.admin_key_issued)
    page.open("/provider")
    row = driver.find_element(page.by.XPATH, "//table[@id='endpoints']//tr[td[1]='/v1/responses']")
    assert row.find_element(page.by.CSS_SELECTOR, "td.p95").text == f"> {top:g} s"
    assert "inf" not in page.text("endpoints") and " ms" not in driver.find_element(page.by.TAG_NAME, "main").text
    page.sign_out()


def test_the_page_has_a_favicon(driver, live):
    page = Page(driver, live.url)
    page.open("/")
    href = driver.find_element(page.by.CSS_SELECTOR, "link[rel='icon']").get_attribute("href")
    width = driver.execute_async_script("""
        const done = arguments[arguments.length - 1], img = new Image();
        img.onload = () => done(img.naturalWidth); img.onerror = () => done(-1); img.src = arguments[0];""", href)
    assert width > 0
    page.open("/favicon.ico")  # asked for by browsers that read no <link rel=icon>
    assert driver.current_url.endswith("/static/favicon.svg")


def test_the_catalogue_fits_a_phone_without_sideways_scrolling(driver, live):
    page = Page(driver, live.url)
    for name in ("bsd-3-clause", "gpl-3.0"):
        live.publish(sample_text(name)[:6000], title=f"A rather long document title for {name} on a phone")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True})
    try:
        page.open("/")
        assert driver.execute_script("return window.innerWidth") == 390
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
        tokens = driver.find_elements(page.by.CSS_SELECTOR, "#catalogue td[data-label='Tokens']")
        assert tokens and all(t.is_displayed() for t in tokens)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_an_agents_account_page_says_how_to_get_funds(driver, live):
    page = Page(driver, live.url)
    page.sign_in(live.account("penniless", "agent", usd="0"))
    page.open("/publisher")
    funds = page.text("get-funds")
    assert "kvmart accounts deposit penniless USD" in funds and "/v1/accounts/penniless/deposits" in funds
    assert page.id("no-funds").is_displayed() and "$0.00" in page.text("no-funds")
    live.services.ledger.deposit("penniless", Decimal("2"))
    page.open("/publisher")
    assert not driver.find_elements(page.by.ID, "no-funds") and page.text("balance") == "$2.00"
    page.sign_out()
