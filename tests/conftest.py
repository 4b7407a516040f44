"""Shared fixtures: the real data root and small real subsets of it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _data_root() -> Path:
    env = os.environ.get("IMCLASS_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def _weights_root() -> Path:
    env = os.environ.get("IMCLASS_WEIGHTS")
    return Path(env) if env else ROOT.parent / "shared" / "weights"


# Under xdist each worker gets one thread: two workers on two cores, no oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one torch thread (faster than two threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not (root / "cifar10").is_dir():
        pytest.fail(f"real data not found under {root}: set IMCLASS_DATA to the shared data folder")
    return root


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    """The shared ImageNet weights folder ($IMCLASS_WEIGHTS, else ../shared/weights); may be absent: tests check."""
    return _weights_root()


@pytest.fixture(scope="session")
def flowers_dir() -> Path:
    """The shared flowers photos (a user's own class-per-folder tree); may be absent: tests check."""
    return _data_root() / "flowers" / "photos"


@pytest.fixture(scope="session")
def cifar_npz(data_root):
    """The raw CIFAR-10 arrays (x_train uint8 NHWC, y_train, x_test, y_test)."""
    with np.load(data_root / "cifar10" / "cifar10.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def cifar_small(cifar_npz):
    """2,000 training and 500 test CIFAR-10 images as uint8 (N, C, H, W) tensors with labels."""
    x = torch.from_numpy(cifar_npz["x_train"][:2000]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(cifar_npz["y_train"][:2000].astype(np.int64))
    xt = torch.from_numpy(cifar_npz["x_test"][:500]).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(cifar_npz["y_test"][:500].astype(np.int64))
    return x, y, xt, yt


# --- a real browser: Debian's chromium driven headless by Playwright ------------------------------

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _chromium_path() -> str | None:
    import shutil

    return os.environ.get("IMCLASS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium_browser():
    """A headless Chromium (Debian's `chromium`; `make test` installs it when missing), one per test:
    Playwright's sync API runs an event loop on this thread while it is open, which would make a later
    test's ``asyncio.run`` fail, so it is closed after each test."""
    exe = _chromium_path()
    if exe is None:
        pytest.skip("no chromium binary: `apt-get install chromium` (make test does this as root) or set IMCLASS_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[dev]'")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def chromium_page(chromium_browser):
    """A fresh page (1280x900) in the headless Chromium; console errors are collected in ``page.console_errors``."""
    context = chromium_browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda msg: page.console_errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()
