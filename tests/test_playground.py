"""The playground page (GET /, server/static/) in-process and in a real headless Chromium.

In-process: `/` serves the page with a Content-Security-Policy that allows only this server,
its JS and CSS come from /static, nothing in them refers to another host, every element the
script looks up exists in the page, the page stays open when `--api-key` is set (the API
behind it does not), and pyproject's package-data globs ship every file of server/static.

In Chromium (Selenium driving the system chromedriver; skipped when either is missing),
against a live server with an API key and a tiny model overfit on a few texts: without the
key the page shows the 401; with it, the model name; a greedy generation arrives in pieces
and ends as the engine's own greedy text; score mode shows one coloured span per character
group whose surprisals equal the engine's per-token logprobs (summed over tokens that share a
UTF-8 character), hotter colours for more surprising tokens, and tooltips with the value and
the text's perplexity. Screenshots go to the test's temp dir and /tmp/kiln_playground.png.
"""

from __future__ import annotations

import codecs
import fnmatch
import math
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model.cli import load_engine
from model.engine import SamplingParams
from server.app import create_app
from server.routes import PLAYGROUND_CSP, STATIC_DIR
from server.settings import ServerSettings
from server.testing import LiveServer, SlowEngine, train_parrot

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
         "The quick brown fox jumps over the lazy dog."]
PROMPT = "To be, or"
# memorised start, then words and a character (é: two byte tokens) the parrot has never seen
SCORE_TEXT = "To be, or not to be, that is the café banana."
API_KEY = "sk-playground-test"
SCREENSHOT_COPY = Path("/tmp/kiln_playground.png")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--disable-extensions", "--window-size=1280,900", "--force-device-scale-factor=1")


# ---- in-process -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(llama_dir):
    return load_engine(str(llama_dir), "cpu", None, max_batch_size=1)


def test_page_and_assets_are_served(tiny_engine):
    with TestClient(create_app(tiny_engine, ServerSettings(served_model_name="tiny"))) as client:
        page = client.get("/")
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == PLAYGROUND_CSP
        assert page.text == (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        for name, content_type in (("playground.js", "javascript"), ("playground.css", "text/css")):
            r = client.get(f"/static/{name}")
            assert r.status_code == 200 and content_type in r.headers["content-type"], (name, r.headers)
            assert r.text == (STATIC_DIR / name).read_text(encoding="utf-8")
        assert client.get("/static/missing.js").status_code == 404
        # the page is reachable under /static too: with the same policy
        assert client.get("/static/index.html").headers["content-security-policy"] == PLAYGROUND_CSP
        assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not part of the API


def test_page_is_open_with_api_key_but_the_api_is_not(tiny_engine):
    settings = ServerSettings(served_model_name="tiny", api_key=API_KEY)
    with TestClient(create_app(tiny_engine, settings)) as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/playground.js").status_code == 200
        assert client.get("/v1/models").status_code == 401
        ok = client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"


def test_page_is_self_contained():
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    js = (STATIC_DIR / "playground.js").read_text(encoding="utf-8")
    css = (STATIC_DIR / "playground.css").read_text(encoding="utf-8")
    for name, text in (("index.html", html), ("playground.js", js), ("playground.css", css)):
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), f"{name} refers to another host"
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(refs) == ["/static/playground.css", "/static/playground.js", "data:,"], refs
    assert "<script>" not in html and " style=" not in html, "inline script/style is blocked by the CSP"
    # the script only calls this server's API, by path
    assert sorted(set(re.findall(r'fetch\("([^"]+)"', js))) == ["/v1/completions", "/v1/models", "/v1/perplexity"]
    ids_used = set(re.findall(r'\$\("([\w-]+)"\)', js))
    ids_defined = set(re.findall(r'\bid="([\w-]+)"', html)) | {"completion"}  # created by the script
    assert ids_used and ids_used <= ids_defined, f"missing from index.html: {sorted(ids_used - ids_defined)}"


def test_package_data_ships_the_static_files():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["server"]
    files = sorted(p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file())
    assert {"static/index.html", "static/playground.js", "static/playground.css"} <= set(files)
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not unshipped, f"server package-data globs {globs} miss {unshipped}"


# ---- headless Chromium ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    binary = next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("the browser test needs Chromium and chromedriver (Debian: apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary  # with both paths given, Selenium Manager never downloads anything
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def parrot_dir(llama_dir, tmp_path_factory):
    return train_parrot(llama_dir, TEXTS, tmp_path_factory.mktemp("parrot"))


def reference_groups(tokenizer, token_ids: list[int], logprobs: list[float | None]) -> list[tuple[str, float | None]]:
    """What the page should show: tokens that end mid-character join the next; surprisal = -sum(logprob)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    groups, pending = [], []
    for token_id, logprob in zip(token_ids, logprobs):
        pending.append(logprob)
        text = decoder.decode(tokenizer.token_bytes(token_id))
        if text:
            scored = [lp for lp in pending if lp is not None]
            groups.append((text, -sum(scored) if scored else None))
            pending = []
    assert not pending, "the scored text ends mid-character"
    return groups


def rgba(css_colour: str) -> tuple[float, float, float, float]:
    values = [float(v) for v in re.findall(r"[\d.]+", css_colour)]
    return tuple(values + [1.0] * (4 - len(values)))  # type: ignore[return-value]


def test_playground_in_headless_chromium(browser, parrot_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ref = load_engine(str(parrot_dir), "cpu", None, max_batch_size=1)
    prompt_ids = ref.tokenizer.encode(PROMPT)
    max_tokens = ref.max_seq_len - len(prompt_ids)
    outs = list(ref.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)))
    expected_text = "".join(o.text for o in outs)
    expected_tokens = sum(len(o.token_ids) for o in outs)
    assert PROMPT + expected_text == TEXTS[0] and outs[-1].finish_reason == "stop"

    engine = SlowEngine(load_engine(str(parrot_dir), "cpu", None, max_batch_size=2), delay=0.02)
    settings = ServerSettings(served_model_name="parrot", api_key=API_KEY)
    wait = WebDriverWait(browser, 20)
    find = lambda element_id: browser.find_element(By.ID, element_id)  # noqa: E731
    text_of = lambda element_id: find(element_id).text  # noqa: E731

    def set_value(element_id: str, value: str) -> None:
        element = find(element_id)
        element.clear()
        element.send_keys(value)

    with LiveServer(create_app(engine, settings)) as server:
        browser.get(server.url + "/")
        assert browser.title == "Kiln playground"
        wait.until(lambda _: text_of("model-name") == "API key required")

        # without the key the API answers 401, and the page says so
        set_value("prompt", PROMPT)
        find("run").click()
        wait.until(lambda _: find("error").is_displayed())
        assert "401" in text_of("error") and "API key" in text_of("error"), text_of("error")

        find("api-key").send_keys(API_KEY, Keys.TAB)  # `change` -> the model list is fetched again
        wait.until(lambda _: text_of("model-name") == "parrot")
        assert "ok" in find("status-dot").get_attribute("class").split()
        assert f"context {ref.max_seq_len} tokens" in text_of("model-detail")

        # out-of-range controls are refused in the page, naming the control and the range
        set_value("temperature", "5")
        find("run").click()
        wait.until(lambda _: "Temperature" in text_of("error"))
        assert text_of("error") == 'Temperature must be a number in [0, 2], got "5"', text_of("error")
        set_value("temperature", "0")
        set_value("max-tokens", "2.5")  # not quietly read as 2
        find("run").click()
        wait.until(lambda _: "integer" in text_of("error"))
        assert text_of("error") == 'Max tokens must be an integer in >= 1, got "2.5"', text_of("error")

        # generate: record every state of the completion as the DOM changes, to see it stream
        set_value("temperature", "0")
        set_value("max-tokens", str(max_tokens))
        browser.execute_script("""
            window.__seen = [];
            new MutationObserver(() => {
              const el = document.getElementById("completion");
              if (el) window.__seen.push(el.textContent);
            }).observe(document.getElementById("output"), {childList: true, subtree: true, characterData: true});
        """)
        find("run").click()
        wait.until(lambda _: "finish:" in text_of("stats"))
        assert not find("error").is_displayed(), text_of("error")
        streamed = browser.execute_script("return document.getElementById('completion').textContent")
        assert streamed == expected_text, f"page {streamed!r} != engine greedy {expected_text!r}"
        stats = text_of("stats")
        assert f"{expected_tokens} tokens" in stats and "finish: stop" in stats, stats
        seen = browser.execute_script("return window.__seen")
        pieces = [s for s in dict.fromkeys(seen) if s and s != expected_text]
        assert all(expected_text.startswith(s) for s in pieces), pieces
        assert len(pieces) >= min(5, expected_tokens // 2), \
            f"only {len(pieces)} partial states of {expected_tokens} tokens: not streamed? {pieces}"
        browser.save_screenshot(str(tmp_path / "playground_generate.png"))

        # score: one coloured span per character group, values from /v1/perplexity
        find("mode-score").click()
        assert not find("sampling").is_displayed() and find("run").text == "Score"
        set_value("prompt", SCORE_TEXT)
        find("run").click()
        wait.until(lambda _: text_of("stats").startswith("perplexity"))
        assert not find("error").is_displayed(), text_of("error")
        spans = browser.execute_script("""
            return Array.from(document.querySelectorAll("#output .tok")).map(s => ({
              text: s.textContent, surprisal: s.dataset.surprisal === undefined ? null : Number(s.dataset.surprisal),
              title: s.title, background: getComputedStyle(s).backgroundColor}));
        """)
        page_perplexity = float(find("stats").get_attribute("data-perplexity"))
        browser.save_screenshot(str(tmp_path / "playground_score.png"))
    shutil.copyfile(tmp_path / "playground_score.png", SCREENSHOT_COPY)

    ids = ([ref.tokenizer.bos_id] if ref.tokenizer.add_bos else []) + ref.tokenizer.encode(SCORE_TEXT)
    result = ref.score([ids])[0]
    groups = reference_groups(ref.tokenizer, result.token_ids, result.logprobs)
    assert any(len(ref.tokenizer.encode(ch)) > 1 for ch in "é"), "the test text should split a character"
    assert [s["text"] for s in spans] == [text for text, _ in groups]
    assert "".join(s["text"] for s in spans).endswith(SCORE_TEXT)
    errors = [abs(s["surprisal"] - want) for s, (_, want) in zip(spans, groups) if want is not None]
    assert [s["surprisal"] is None for s in spans] == [want is None for _, want in groups]
    assert max(errors) < 1e-4, f"surprisal vs engine.score: max error {max(errors):.2e}, " \
                               f"mean {sum(errors) / len(errors):.2e}"
    mean_nll = -sum(lp for lp in result.logprobs if lp is not None) / result.num_scored
    assert math.isclose(page_perplexity, math.exp(mean_nll), rel_tol=1e-4), (page_perplexity, math.exp(mean_nll))

    scored = [s for s in spans if s["surprisal"] is not None]
    coolest = min(scored, key=lambda s: s["surprisal"])
    hottest = max(scored, key=lambda s: s["surprisal"])
    assert hottest["surprisal"] - coolest["surprisal"] > 2.0, (coolest, hottest)  # memorised vs unseen words
    r_cool, g_cool, _, a_cool = rgba(coolest["background"])
    r_hot, g_hot, _, a_hot = rgba(hottest["background"])
    assert r_hot - g_hot > r_cool - g_cool and a_hot > a_cool, (coolest["background"], hottest["background"])
    shown = f"{page_perplexity:.3f}" if page_perplexity < 100 else f"{page_perplexity:.1f}"
    for span in scored:
        shown_surprisal = re.search(r"surprisal ([\d.]+) nats", span["title"])
        assert shown_surprisal and abs(float(shown_surprisal.group(1)) - span["surprisal"]) <= 1e-3, span
        assert f"text perplexity {shown}" in span["title"], span
