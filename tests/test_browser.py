"""The browser fixture itself: a local page renders and its embedded image loads."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def test_chromium_renders_a_local_page_with_an_embedded_image(chromium_page, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(buf, format="PNG")
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    page_file = tmp_path / "page.html"
    page_file.write_text(f"<html><body><h1 id='t'>accuracy 0.875</h1><img id='i' src='{src}'></body></html>")
    chromium_page.goto(page_file.as_uri())
    assert chromium_page.inner_text("#t") == "accuracy 0.875"
    assert chromium_page.eval_on_selector("#i", "img => [img.complete, img.naturalWidth, img.naturalHeight]") == [True, 12, 8]
    chromium_page.screenshot(path=str(tmp_path / "shot.png"))
    assert (tmp_path / "shot.png").stat().st_size > 0 and chromium_page.console_errors == []


def test_an_event_loop_is_free_after_a_browser_test():
    """The browser fixture leaves no running event loop behind (asyncio.run works in the next test)."""
    import asyncio

    async def answer():
        return 42

    assert asyncio.run(answer()) == 42
