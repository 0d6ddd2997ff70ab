"""The page for people (serving/page.py) driven in headless Chromium (Debian's, through
Playwright) against a real TorchServe: upload by file picker, several files, drag and drop,
paste, an example click, a bad file's message, a file too large (refused before upload),
the saliency overlay, the version picker, labels rendered as text, a server that is down.

The screenshot the README shows is written here: build/screenshots/page.png.
"""

import json
import os
import re
import threading
from pathlib import Path

import pytest
import requests
import torch
from playwright.sync_api import expect
from werkzeug.serving import make_server

from conftest import ROOT, build_archive, encode, make_checkpoint, running_server, scene
from serving.management import Management
from serving.page import CSP, PageConfig, create_app
from serving.server import free_ports
from training.predict import load_classifier

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
CHROMIUM = "/usr/bin/chromium"
MODEL = "page3"
CLASSES = ["forest", "<b>sea</b>", "street"]  # a label that is HTML must show as text
SCREENSHOTS = ROOT / "build" / "screenshots"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page-ckpt")
    return {v: make_checkpoint(tmp / f"{v}.pt", CLASSES, seed=seed) for v, seed in (("1.0", 11), ("2.0", 12))}


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoints):
    store = tmp_path_factory.mktemp("page-store")
    build_archive(checkpoints["1.0"], store, MODEL, "--topk", "3", "--num-threads", "1")
    build_archive(checkpoints["2.0"], store, MODEL, "--topk", "3", "--num-threads", "1",
                  "--version", "2.0", "--archive-name", f"{MODEL}_v2")
    with running_server(tmp_path_factory.mktemp("page-ts"), store, [f"{MODEL}={MODEL}.mar"]) as ts:
        Management(ts.url("management"), ts.token("management"), timeout_s=120).register(f"{MODEL}_v2.mar")
        yield ts


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    for i, label in enumerate(["forest", "street"]):
        (root / label).mkdir()
        (root / label / f"{label}_{i}.jpg").write_bytes(encode(scene(seed=60 + i)))
    return root


def serve_app(app):
    port = free_ports(1)[0]
    httpd = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def page_url(server, examples):
    config = PageConfig(inference_url=server.url("inference"), management_url=server.url("management"),
                        key_file=server.workdir / "key_file.json", examples=examples,
                        max_files=4, max_file_bytes=200_000)
    httpd, url = serve_app(create_app(config))
    yield url
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture()
def page(browser, page_url):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    pg.api_calls = []
    pg.on("request", lambda r: pg.api_calls.append(r.url) if "/api/predict" in r.url else None)
    pg.goto(page_url)
    expect(pg.locator("#version option")).to_have_count(2)
    yield pg
    context.close()


def expected(checkpoint, image: bytes) -> list[tuple[str, str]]:
    """(label, percentage text) of the 3 classes as the page shows them, from the model in-process."""
    model, classes, tf = load_classifier(checkpoint, torch.device("cpu"))
    with torch.inference_mode():
        probs = model(tf.load(image)[None]).softmax(1)[0]
    top = probs.topk(3)
    return [(classes[i], f"{100 * p:.1f} %") for p, i in zip(top.values.tolist(), top.indices.tolist())]


def card_bars(card) -> list[tuple[str, str]]:
    card.locator(".bar").first.wait_for()
    return [(b.locator(".label").text_content(), b.locator(".pct").text_content())
            for b in card.locator(".bar").all()]


def photo(tmp_path, name: str, seed: int) -> Path:
    path = tmp_path / name
    path.write_bytes(encode(scene(seed=seed)))
    return path


def drop_or_paste(page, event: str, target: str, files: list[Path]):
    """Dispatches a drop (or paste) event carrying ``files``, as a person's drag or Ctrl+V."""
    payload = [{"name": f.name, "bytes": list(f.read_bytes())} for f in files]
    page.evaluate("""([event, target, files]) => {
        const dt = new DataTransfer();
        for (const f of files) dt.items.add(new File([new Uint8Array(f.bytes)], f.name, {type: "image/jpeg"}));
        const node = document.querySelector(target);
        const e = event === "paste" ? new ClipboardEvent("paste", {clipboardData: dt, bubbles: true})
                                    : new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true});
        node.dispatchEvent(e);
    }""", [event, target, payload])


def test_upload_shows_the_models_top_k_as_bars(page, checkpoints, tmp_path):
    f = photo(tmp_path, "one.jpg", 1)
    page.set_input_files("#files", str(f))
    card = page.locator(".card").first
    assert card.locator("h3").text_content() == "one.jpg"
    assert card_bars(card) == expected(checkpoints["1.0"], f.read_bytes())
    # the HTML label is text: no <b> element was made from it
    assert "<b>sea</b>" in [label for label, _ in card_bars(card)]
    assert page.locator(".bar .label b").count() == 0
    width = card.locator(".bar .fill").first.evaluate("n => n.style.width")
    assert width == card_bars(card)[0][1].replace(" ", "")  # the bar is the percentage


def test_several_files_drag_and_drop_and_paste(page, checkpoints, tmp_path):
    files = [photo(tmp_path, f"f{i}.jpg", 10 + i) for i in range(3)]
    page.set_input_files("#files", [str(f) for f in files])
    expect(page.locator(".card .bar")).to_have_count(9)
    drop_or_paste(page, "drop", "#drop", files[:1])
    drop_or_paste(page, "paste", "body", files[1:2])
    expect(page.locator(".card .bar")).to_have_count(15)
    cards = page.locator(".card")
    names = [c.locator("h3").text_content() for c in cards.all()]
    assert names == ["f1.jpg", "f0.jpg", "f2.jpg", "f1.jpg", "f0.jpg"]  # newest first
    for card, name in zip(cards.all(), names):
        assert card_bars(card) == expected(checkpoints["1.0"], (tmp_path / name).read_bytes())


def test_example_click_classifies_it(page, checkpoints, examples):
    gallery = page.locator("#gallery button")
    gallery.first.wait_for()
    assert [b.locator("span").text_content() for b in gallery.all()] == ["forest", "street"]
    gallery.nth(1).click()
    card = page.locator(".card").first
    card.locator(".bar").first.wait_for()
    assert card.locator("h3").text_content() == "street_1.jpg"
    assert card_bars(card) == expected(checkpoints["1.0"], (examples / "street" / "street_1.jpg").read_bytes())


def test_bad_and_too_large_files_get_clear_messages(page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not a photo")
    big = tmp_path / "huge.jpg"
    big.write_bytes(b"\xff" * 300_000)  # over the page's 200 kB limit
    good = photo(tmp_path, "ok.jpg", 3)
    page.set_input_files("#files", [str(bad), str(big), str(good)])
    expect(page.locator(".card .bar")).to_have_count(3)
    cards = {c.locator("h3").text_content(): c for c in page.locator(".card").all()}
    cards["notes.jpg"].locator(".error").filter(has_text="cannot identify").wait_for()
    assert cards["notes.jpg"].locator(".bar").count() == 0
    assert cards["huge.jpg"].locator(".error").text_content() == "huge.jpg is 300 kB: at most 200 kB per photo."
    assert len(page.api_calls) == 2  # the large file was never sent
    assert cards["ok.jpg"].locator(".bar").count() == 3


def test_saliency_overlay_and_screenshot(page, tmp_path):
    f = photo(tmp_path, "look.jpg", 5)
    page.set_input_files("#files", str(f))
    card = page.locator(".card").first
    card.locator(".bar").first.wait_for()
    card.locator("button.explain").click()
    overlay = card.locator("canvas.overlay")
    overlay.wait_for(state="visible")
    expect(overlay).to_have_attribute("data-label", re.compile(".+"))
    painted = overlay.evaluate("""c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                                         let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
    assert painted > 100  # pixels shaded by the map
    assert overlay.evaluate("c => c.dataset.label") == card_bars(card)[0][0]
    assert "shaded" in card.locator(".status").text_content()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "page-test.png"), full_page=True)


def test_version_picker_switches_the_model(page, checkpoints, tmp_path):
    f = photo(tmp_path, "v.jpg", 7)
    page.set_input_files("#files", str(f))
    card = page.locator(".card").first
    v1 = expected(checkpoints["1.0"], f.read_bytes())
    v2 = expected(checkpoints["2.0"], f.read_bytes())
    assert v1 != v2
    assert card_bars(card) == v1
    options = page.locator("#version option")
    assert [o.text_content() for o in options.all()] == ["1.0 (default)", "2.0"]
    page.select_option("#version", "2.0")
    expect(card.locator(".pct").first).to_have_text(v2[0][1])
    assert card_bars(card) == v2
    assert "2.0" in card.locator(".status").text_content()


def test_responses_hold_no_key_and_carry_the_policy(page_url, server):
    keys = json.loads((server.workdir / "key_file.json").read_text())
    secrets = {keys[api]["key"] for api in ("inference", "management")}
    for path in ("/", "/static/page.js", "/api/models", "/api/config", "/api/examples"):
        r = requests.get(page_url + path, timeout=10)
        assert r.status_code == 200 and r.headers["Content-Security-Policy"] == CSP
        assert not any(s in r.text for s in secrets)
    assert requests.get(page_url + "/static/../serving/page.py", timeout=10).status_code == 404
    assert requests.get(page_url + "/examples/99", timeout=10).status_code == 404
    files = [("image", (f"{i}.jpg", encode(scene(seed=i)), "image/jpeg")) for i in range(5)]
    r = requests.post(page_url + "/api/predict", files=files, data={"model": MODEL}, timeout=30)
    assert r.status_code == 413 and "at most 4" in r.json()["error"]
    r = requests.post(page_url + "/api/predict", files=files[:1], data={"model": "../x"}, timeout=30)
    assert r.status_code == 400


def test_a_server_that_is_down_is_named(browser, tmp_path):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    httpd, url = serve_app(create_app(PageConfig(inference_url=dead, management_url=dead,
                                                 key_file=tmp_path / "none.json")))
    try:
        pg = browser.new_page()
        pg.goto(url)
        pg.locator("#banner").filter(has_text="not reachable").wait_for()
        pg.close()
    finally:
        httpd.shutdown()


@pytest.mark.skipif(not os.environ.get("PAGE_SCREENSHOT_STORE"),
                    reason="the README's screenshot: PAGE_SCREENSHOT_STORE (a model store), "
                           "PAGE_SCREENSHOT_MODEL, PAGE_SCREENSHOT_EXAMPLES (photos to show)")
def test_readme_screenshot(browser, tmp_path):
    """The README's picture: a real model's page after three example clicks and an explanation,
    written to build/screenshots/page.png. (The README's was taken with openly licensed photos,
    scikit-learn's sample images: the intel-scenes photos may not be redistributed.)"""
    model = os.environ.get("PAGE_SCREENSHOT_MODEL", "intel-scenes")
    with running_server(tmp_path, Path(os.environ["PAGE_SCREENSHOT_STORE"]), [f"{model}={model}.mar"]) as ts:
        config = PageConfig(inference_url=ts.url("inference"), management_url=ts.url("management"),
                            key_file=ts.workdir / "key_file.json",
                            examples=Path(os.environ["PAGE_SCREENSHOT_EXAMPLES"]))
        httpd, url = serve_app(create_app(config))
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 900})
            pg.goto(url)
            gallery = pg.locator("#gallery button")
            gallery.first.wait_for()
            n = gallery.count()
            for clicks, i in enumerate(sorted({n - 1, n // 2, 0}, reverse=True), 1):
                gallery.nth(i).click()  # newest first: the first click ends up last
                expect(pg.locator(".card .bar")).to_have_count(3 * clicks)
            card = pg.locator(".card").first
            card.locator("button.explain").click()
            expect(card.locator("canvas.overlay")).to_have_attribute("data-label", re.compile(".+"))
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            pg.screenshot(path=str(SCREENSHOTS / "page.png"), full_page=True)
        finally:
            httpd.shutdown()
