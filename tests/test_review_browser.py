"""The review page in a real headless browser (Debian's chromium driven by Playwright): label by keyboard and
by button, undo, reload and continue, a second reviewer, the server SIGKILLed mid-session and restarted —
and the labels file holds every label exactly once. Screenshots of the page and the report are taken (copied
to docs/ with QEMBED_DOCS_SCREENSHOTS=1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright
from serve_helpers import free_port

from qembed.data.jsonl import write_jsonl
from qembed.review.labels import fold, read_review

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip

FARMER = "A rice farmer in Hunan who grows two crops a year and sells to a cooperative."
PATHOLOGIST = "A plant pathologist at a provincial academy studying fungal diseases of cereals."
BLAST = ("Rice blast, caused by the fungus Magnaporthe oryzae, is the most destructive disease of rice. Lesions "
         "are spindle-shaped with grey centres and brown margins. Warm, humid weather and heavy nitrogen favour "
         "it. Control combines resistant varieties, balanced fertiliser and a tricyclazole spray at booting and "
         "again at heading when the forecast is wet. ") * 3  # fmt: skip
TILLER = "分蘗期是水稻产量形成的关键时期。此时应浅水勤灌，追施分蘗肥，每亩施尿素5至7公斤，促进早发分蘗。"
MAIZE = "Maize rust shows as small cinnamon-brown pustules on both leaf surfaces; it rarely needs a fungicide."


def _records() -> list[dict]:
    rows = [
        ("retrieval", "acquire_knowledge", "university", "en", FARMER, "when should I spray tricyclazole against rice blast", BLAST, 0.83),
        ("retrieval", "keywords", "high_school", "en", FARMER, "rice blast grey spindle lesions", BLAST, 0.79),
        ("retrieval", "yes_or_no", "phd", "en", PATHOLOGIST, "does heavy nitrogen favour Magnaporthe oryzae", BLAST, 0.74),
        ("retrieval", "summary", "university", "zh", FARMER, "水稻分蘗期怎样管水和追肥", TILLER, 0.81),
        ("retrieval", "background", "phd", "en", PATHOLOGIST, "why is maize rust rarely sprayed", MAIZE, 0.71),
        ("retrieval", "keywords", "high_school", "en", FARMER, "maize rust fungicide", BLAST, 0.52),
        ("sts", "paraphrase", None, "en", None, "Maize rust appears as small brown pustules on both sides of the leaf.", MAIZE, 0.88),
        ("bitext", "translation", None, "en", None, "The tillering stage is key to rice yield.", TILLER, 0.69),
        ("classification", "classification", None, "en", None, "brown spots spread on the leaves after rain",
         "Crop diseases: diseases of crops, their causes and control", 0.62),
        ("retrieval", "acquire_knowledge", "university", "en", PATHOLOGIST, "how much urea per mu at tillering", BLAST, 0.41),
    ]  # fmt: skip
    topics = ["rice blast", "sheath blight", "wheat rust", "maize borer", "paddy drainage", "urea timing"]
    qtypes = ["keywords", "acquire_knowledge", "summary", "yes_or_no", "background"]
    for j in range(30):  # more retrieval pairs, their cosines spread from 0.35 to 0.92
        rows.append(("retrieval", qtypes[j % 5], ("high_school", "university", "phd")[j % 3], "en",
                     (FARMER, PATHOLOGIST)[j % 2], f"{topics[j % 6]} question {j}", (BLAST, MAIZE)[j % 2],
                     round(0.35 + 0.57 * ((j * 7) % 30) / 29, 3)))  # fmt: skip
    records = []
    for i, (task, qtype, difficulty, language, persona, query, passage, score) in enumerate(rows):
        records.append({"query": query, "pos": [passage], "neg": [], "query_id": f"d{i}-{task[:3]}0",
                        "meta": {"task": task, "question_type": qtype, "difficulty": difficulty, "language": language,
                                 "character": persona, "score": score}})  # fmt: skip
    return records


def planted_relevant(item: dict) -> bool:
    """What the API-labelled part of the sample is called: mostly relevant above cosine 0.6, with some misses."""
    return (item["cosine"] > 0.6) != (int(item["id"][1:].split("-")[0]) % 7 == 3)


class ReviewServer:
    """`python -m qembed review ...` in a subprocess on a fixed port (so a restart keeps the page's address)."""

    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.args, self.port, self.log = args, port, log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ReviewServer:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "qembed", "review", *self.args, "--port", str(self.port)],
                                        stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"review server did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def _settled(page, done: int) -> None:
    """Wait until the page shows `done` labels and no request is on its way. Every label is fsynced, which on a
    shared disk under the other test worker's writes can take seconds: the wait is generous, and on a timeout
    the message says what the page showed."""
    try:
        page.wait_for_function(f"document.body.dataset.done === '{done}' && !document.body.dataset.busy",
                               timeout=120_000)  # fmt: skip
    except PlaywrightTimeout:
        shown = page.evaluate("({...document.body.dataset, status: document.getElementById('status').textContent,"
                              " focus: document.activeElement.tagName})")  # fmt: skip
        raise AssertionError(f"the page did not reach {done} labels: {shown}") from None


def test_label_undo_reload_kill_restart_in_a_real_browser(tmp_path):
    raw, filtered, labels = tmp_path / "synth.jsonl", tmp_path / "filtered.jsonl", tmp_path / "labels.jsonl"
    records = _records()
    write_jsonl(raw, records)
    write_jsonl(filtered, [r for r in records if r["meta"]["score"] > 0.7])
    server = ReviewServer(["--labels", str(labels), "--input", str(raw), "--input", str(filtered), "--sample", "1",
                           "--seed", "4"], free_port(), tmp_path / "server.log").start()  # fmt: skip
    order = [item["id"] for item in read_review(labels).items]
    shots = tmp_path / "shots"
    shots.mkdir()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 600})
            page.goto(server.url)
            page.fill("#name", "alice")
            page.keyboard.press("Enter")
            _settled(page, 0)
            assert page.inner_text("#progress-text") == f"0 / {len(order)}"
            assert page.get_attribute("body", "data-item") == order[0]
            page.keyboard.press("1")
            _settled(page, 1)
            page.keyboard.press("0")
            _settled(page, 2)
            page.keyboard.press("s")
            _settled(page, 3)
            page.keyboard.press("u")  # undo the skip: the same item again
            _settled(page, 2)
            assert page.get_attribute("body", "data-item") == order[2]
            assert page.inner_text("#status") == "Undone."
            page.keyboard.press("1")
            _settled(page, 3)
            page.click("button.no")  # the buttons do the same as the keys
            _settled(page, 4)
            assert page.get_attribute("body", "data-item") == order[4]
            width = page.eval_on_selector("#progress-fill", "e => e.style.width")
            assert width == f"{100 * 4 / len(order):g}%"
            page.screenshot(path=str(shots / "review-page.png"))

            page.reload()  # the reviewer is remembered and continues where they were
            _settled(page, 4)
            assert page.get_attribute("body", "data-item") == order[4]

            server.kill()  # SIGKILL mid-session: the next label waits for the server, then is saved once
            page.keyboard.press("1")
            page.wait_for_function("document.getElementById('status').textContent.includes('unreachable')")
            server.start()
            _settled(page, 5)
            page.keyboard.press("0")
            _settled(page, 6)

            bob = browser.new_context(viewport={"width": 1000, "height": 600}).new_page()  # a second reviewer
            bob.goto(server.url)
            bob.fill("#name", "bob")
            bob.keyboard.press("Enter")
            _settled(bob, 0)
            for key, done in (("1", 1), ("1", 2), ("0", 3)):
                bob.keyboard.press(key)
                _settled(bob, done)
            bob.reload()
            _settled(bob, 3)
            assert "alice (6)" in bob.inner_text("#others")

            # the rest of the sample through the API, so the report has something to show
            items = read_review(labels).items
            for reviewer, start, stop in (("alice", 6, len(items)), ("bob", 3, 28)):
                for item in items[start:stop]:
                    relevant = planted_relevant(item) != (reviewer == "bob" and item["cosine"] > 0.85)
                    body = {"reviewer": reviewer, "item": item["id"], "label": "relevant" if relevant else "not_relevant",
                            "event": f"{reviewer}-{item['id']}"}  # fmt: skip
                    httpx.post(f"{server.url}/api/label", json=body, timeout=10).raise_for_status()

            report = bob.context.new_page()
            report.set_viewport_size({"width": 1000, "height": 1250})
            report.goto(f"{server.url}/report")
            assert "Relevance accuracy" in report.inner_text("body")
            assert report.eval_on_selector("img", "e => e.naturalWidth") > 0  # the inline plot decoded
            text = report.inner_text("body")
            assert "alice" in text and "bob" in text and "Cohen" in text and "alice\tbob\t28" in text
            report.screenshot(path=str(shots / "review-report.png"))
            browser.close()
    finally:
        server.stop()

    review = read_review(labels)
    assert len({e["event"] for e in review.events}) == len(review.events)  # no line written twice
    given = Counter((e["reviewer"], e["item"]) for e in review.events if e["type"] == "label")
    assert given == {**{("alice", i): 1 for i in order}, ("alice", order[2]): 2, **{("bob", i): 1 for i in order[:28]}}
    (undo,) = [e for e in review.events if e["type"] == "undo"]
    assert undo["target"] == next(e["event"] for e in review.events if e["item"] == order[2] and e["label"] == "skip")
    current = fold(review.events)
    assert [(item, e["label"]) for item, e in list(current["alice"].items())[:6]] == [
        (order[0], "relevant"), (order[1], "not_relevant"), (order[2], "relevant"), (order[3], "not_relevant"),
        (order[4], "relevant"), (order[5], "not_relevant")]  # fmt: skip
    assert [e["label"] for e in current["bob"].values()][:3] == ["relevant", "relevant", "not_relevant"]
    for name in ("review-page.png", "review-report.png"):
        data = (shots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
        if os.environ.get("QEMBED_DOCS_SCREENSHOTS") == "1":  # for the documentation: a small palette PNG
            from PIL import Image

            image = Image.open(shots / name).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
            image.save(ROOT / "docs" / name, optimize=True)


@pytest.fixture(autouse=True)
def _chromium_present():
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: make install-test installs it"
