"""Screenshots of the market page (docs/web-*.png) over a realistic small catalogue, taken in headless Chromium.

Starts `kvmart serve`'s app with builtin:tiny in a temporary data directory, publishes the bundled licence texts
and a few release notes under public, priced and private licences from two publishers, lets three agents read them,
then photographs the catalogue (on a desktop and on a 390 px phone), a document page with a streamed answer and its
time to first token, a publisher's page, an agent's page and the provider's page.

    python bench/screenshots.py --out docs            # needs chromium and chromium-driver (apt)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import uvicorn
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from kvmart.app import create_app
from kvmart.config import Settings
from kvmart.reuse.samples import sample_text
from kvmart.server import ServerSettings

MODEL = "builtin:tiny"
NOTES = ("Release notes v{v}.0\n\nThis release changes the store format to version {v}, adds a tiered cache "
         "(RAM, disk, object storage), and makes every cache read metered by the ledger. Upgrade with care: "
         "artifacts written by v{p}.x are read but not written. Known issues: none reported.\n\n")
CATALOGUE = [  # (publisher, title, text, licence fields)
    ("acme-legal", "BSD 3-Clause License", sample_text("bsd-3-clause"), {}),
    ("acme-legal", "Apache License 2.0", sample_text("apache-2.0"), {}),
    ("acme-legal", "Mozilla Public License 2.0", sample_text("mpl-2.0"),
     {"licence": "priced", "cache_read_usd_per_mtok": "0.25"}),
    ("acme-legal", "GNU GPL v3, sections 0-6", sample_text("gpl-3.0")[:12000],
     {"licence": "priced", "cache_read_usd_per_mtok": "0.05", "royalty_share": "0.6"}),
    ("docs-co", "kvmart release notes v2.0", NOTES.format(v=2, p=1) * 6, {}),
    ("docs-co", "kvmart release notes v3.0", NOTES.format(v=3, p=2) * 8, {}),
    ("docs-co", "Board minutes (private)", NOTES.format(v=9, p=8) * 4, {"licence": "private"}),
]
READS = {"BSD 3-Clause License": 6, "Apache License 2.0": 4, "Mozilla Public License 2.0": 3,
         "GNU GPL v3, sections 0-6": 1, "kvmart release notes v3.0": 5, "kvmart release notes v2.0": 2}


def serve(data_dir: Path):
    settings = Settings(data_dir=data_dir, model=MODEL, dtype="float32")
    app = create_app(settings, ServerSettings(port=0, log_level="warning"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return app, server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def populate(app, url: str) -> dict[str, str]:
    """Accounts, documents and reads; the API keys by account name."""
    ledger, keys = app.state.services.ledger, {"admin": app.state.services.ledger.admin_key_issued}
    for name, role in (("acme-legal", "publisher"), ("docs-co", "publisher"), ("agent-alpha", "agent"),
                       ("agent-beta", "agent"), ("agent-gamma", "agent")):
        keys[name] = ledger.create_account(name, role)[1]
        ledger.deposit(name, Decimal("25"))
    ids = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for publisher, title, text, terms in CATALOGUE:
            response = http.post("/v1/documents", headers={"Authorization": f"Bearer {keys[publisher]}"},
                                 json={"text": text, "title": title, **terms})
            if response.status_code >= 400:
                raise SystemExit(f"publishing {title!r} failed: {response.text}")
            ids[title] = response.json()["id"]
        agents = ["agent-alpha", "agent-beta", "agent-gamma"]
        for i, (title, _count) in enumerate((t, n) for t, n in READS.items() for _ in range(n)):
            http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {keys[agents[i % 3]]}"}, json={
                "model": MODEL, "messages": [{"role": "user", "content": "Summarise the obligations."}],
                "max_tokens": 12, "temperature": 0, "documents": [ids[title]]}).raise_for_status()
    keys["_doc"] = ids["BSD 3-Clause License"]
    return keys


def shoot(driver, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(700, height))
    driver.execute_script("window.scrollTo(0, 0)")  # the Try it box scrolled the page: photograph it whole
    driver.save_screenshot(str(path))
    print(f"wrote {path}")


def shoot_phone(driver, path: Path) -> None:
    """The page as a 390 px wide phone shows it (device metrics emulated, at 2 device pixels per CSS pixel)."""
    metrics = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    driver.refresh()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": max(844, height)})
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"wrote {path}")


def sign_in(driver, wait, url: str, key: str) -> None:
    driver.get(url + "/signin")
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.ID, "signin-button").click()
    wait.until(lambda d: "/signin" not in d.current_url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    torch_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        app, server, url = serve(Path(tmp))
        keys = populate(app, url)
        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                     "--hide-scrollbars", "--force-device-scale-factor=1"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
        wait = WebDriverWait(driver, 60)
        try:
            sign_in(driver, wait, url, keys["agent-alpha"])
            driver.get(url + "/")
            shoot(driver, args.out / "web-catalogue.png")
            shoot_phone(driver, args.out / "web-catalogue-phone.png")
            driver.get(url + "/publisher")
            shoot(driver, args.out / "web-agent.png")
            driver.get(url + f"/documents/{keys['_doc']}")
            driver.find_element(By.ID, "question").send_keys("Who may redistribute the software?")
            driver.find_element(By.ID, "ask-button").click()
            wait.until(lambda d: d.find_element(By.ID, "ask-usage").is_displayed())
            shoot(driver, args.out / "web-document.png")
            sign_in(driver, wait, url, keys["acme-legal"])
            shoot(driver, args.out / "web-publisher.png")
            sign_in(driver, wait, url, keys["admin"])
            shoot(driver, args.out / "web-provider.png")
        finally:
            driver.quit()
            server.should_exit = True
    print(f"(torch threads: {torch_threads})")


if __name__ == "__main__":
    main()
