"""The chat page at / in headless Chromium (Debian's chromium + chromium-driver) against `exo-medusa serve` on a
tiny model with random Medusa heads: it loads, streams a reply equal to the API's, marks each step's text by how it
came, and a screenshot is saved (EXO_MEDUSA_SCREENSHOT names where, else the test's folder)."""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest

# the fixtures (server) are imported by name: pytest finds them here
from helpers_server import call, chat, server, text_of
from helpers_webdriver import find_chromium, headless_chromium

CHROMIUM = find_chromium()
PROMPT = "Tell me a story."


def test_the_page_is_served_with_a_strict_policy(server):
    with urllib.request.urlopen(server["url"] + "/", timeout=60) as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        policy = response.headers["Content-Security-Policy"]
        page = response.read().decode()
    assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy
    assert "/v1/chat/completions" in page and "medusa_sources" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium and chromedriver (apt install chromium chromium-driver)")
def test_the_page_streams_the_apis_reply_in_chromium(server, tmp_path):
    _, expected = chat(server, PROMPT)
    with headless_chromium(*CHROMIUM) as page:
        page.open(server["url"] + "/")
        assert page.wait_for("return document.getElementById('model').textContent", 60) == server["model"]
        page.type("#prompt", PROMPT)
        page.click("#send")
        page.wait_for("const t = document.querySelector('.turn.assistant'); return t && t.dataset.done", 600)
        shown = page.run("return document.querySelector('.turn.assistant').textContent")
        steps = page.run("return [...document.querySelectorAll('.turn.assistant .step')].map(s => s.className)")
        speed = page.run("return document.getElementById('speed').textContent")
        per_step = page.run("return document.getElementById('per-step').textContent")
        screenshot = Path(os.environ.get("EXO_MEDUSA_SCREENSHOT") or tmp_path / "chat-page.png")
        page.screenshot(screenshot)
    assert shown == text_of(expected)
    # each chunk's text is marked by its Medusa steps' source and whether drafts were accepted; only the prefill's
    # first token (when it came alone) has no step
    assert len(steps) > 1 and steps[1:] and all(
        s == "step prefill" or s.split()[1:] in ([src, how] for src in ("plain", "heads", "context", "datastore")
                                                 for how in ("accepted", "bonus")) for s in steps), steps
    assert any(s != "step prefill" for s in steps)
    assert float(speed) > 0 and float(per_step) >= 1
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert call(server, "/v1/models")[0] == 200
