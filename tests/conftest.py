"""Shared fixtures (the real data root and small real subsets of it) and the rule that CI cannot skip.

Under ``CI=true`` (and ``make test``, which sets ``IMCLASS_TEST_STRICT=1``) every input a CI machine
always has is required: the session stops at once, before any test, naming what is missing and how to
install it or where to put it (``missing_inputs``); and a test that still skips fails, unless it is marked
``cuda`` or skipped through ``lacks_hardware`` (what this machine kind truly lacks: a GPU, a CPU
instruction). Every run ends with one line per skip and its reason.
"""
from __future__ import annotations

import importlib.util
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


HARDWARE_SKIP = "machine lacks"  # the prefix of the only skips CI allows besides the `cuda` marker


def strict() -> bool:
    """True under CI (``CI=true``/``1``) or ``make test`` (``IMCLASS_TEST_STRICT=1``): nothing may be skipped."""
    return (os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
            or os.environ.get("IMCLASS_TEST_STRICT", "") not in ("", "0"))


def lacks_hardware(what: str) -> None:
    """Skip because this machine kind lacks ``what`` (a GPU, a CPU instruction): the one skip CI allows."""
    pytest.skip(f"{HARDWARE_SKIP} {what}")


def require_kernel(backend: str) -> None:
    """Skip a k-NN kernel case only when the CPU lacks its instruction; fail when the CPU has it but the
    kernel cannot run (a broken install must not pass as a smaller test matrix)."""
    from imclass.knn import _knn_int8, _knn_kernels, _select

    if backend == "numba" and not _knn_kernels.available():
        if "avx2" not in _select.cpu()[1]:
            lacks_hardware("AVX2 (the numba k-NN kernels use vpsadbw/vpmaddwd)")
        pytest.fail("the numba k-NN kernels do not run on this AVX2 CPU: pip install numba (pip install -e '.[dev]')")
    if backend == "int8" and not _knn_int8.exact_here(3072):
        if not _select.vnni_here():
            lacks_hardware("VNNI (the int8 k-NN kernel is only expected on a CPU with avx512_vnni/avx_vnni/amx_int8)")
        pytest.fail(f"the int8 k-NN kernel (torch._int_mm) is not exact on this VNNI CPU (torch {torch.__version__})")


def evaluated_accuracy(run: Path, dataset: Path | str, split: str = "test") -> float:
    """The accuracy `imclass evaluate RUN DATASET --split SPLIT --json` reports for a saved run: an independent
    recomputation a training report's accuracy must equal (the same model, images and test-time augmentation)."""
    import json

    from typer.testing import CliRunner

    from imclass.cli import app

    result = CliRunner().invoke(app, ["evaluate", str(run), str(dataset), "--split", split, "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["accuracy"]


def missing_inputs() -> list[str]:
    """What a CI machine must have and this one lacks, each with what to install or where to put it."""
    from imclass.models.weights import KNOWN_WEIGHTS

    problems = []
    data, weights = _data_root(), _weights_root()
    if not (data / "cifar10").is_dir():
        problems.append(f"CIFAR-10 not under {data / 'cifar10'}: set IMCLASS_DATA to the shared data folder "
                        "(or `imclass data download cifar10`)")
    flowers = data / "flowers" / "photos"
    classes = [d for d in flowers.iterdir() if d.is_dir()] if flowers.is_dir() else []
    if len(classes) != 5:
        problems.append(f"the flowers photos (5 class folders) are not under {flowers} ({len(classes)} found): "
                        "put tf_flower_photos there (IMCLASS_DATA/flowers/photos)")
    wanted = ["imagenet_classes.txt"] + [k.path for k in KNOWN_WEIGHTS.values()]
    absent = [w for w in wanted if not (weights / w).is_file()]
    if absent:
        problems.append(f"the ImageNet weights folder {weights} lacks {', '.join(absent)}: point IMCLASS_WEIGHTS at "
                        "the shared weights folder (see its README.md)")
    if _chromium_path() is None:
        problems.append("no chromium binary: `make browser` (apt-get install chromium, as root) or set IMCLASS_CHROMIUM")
    for module, package in (("playwright", "playwright"), ("faiss", "faiss-cpu"), ("pyarrow", "pyarrow"),
                            ("captum", "captum"), ("numba", "numba"), ("threadpoolctl", "threadpoolctl")):
        if importlib.util.find_spec(module) is None:
            problems.append(f"the {module} package is missing: pip install -e '.[dev]' (or pip install {package})")
    from imclass.knn import _knn_int8, _knn_kernels, _select

    flags = _select.cpu()[1]
    if "avx2" in flags and not _knn_kernels.available():
        problems.append("the numba k-NN kernels do not run on this AVX2 CPU: pip install numba")
    if _select.vnni_here() and not _knn_int8.exact_here(3072):
        problems.append(f"the int8 k-NN kernel is not exact on this VNNI CPU (torch {torch.__version__}'s _int_mm)")
    return problems


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (the only test CI may skip for want of hardware)")


def pytest_sessionstart(session):
    """Under CI, stop before the first test when a required input is missing (fail fast, say what to do)."""
    if not strict() or hasattr(session.config, "workerinput"):  # checked once, in the controller
        return
    problems = missing_inputs()
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        pytest.exit(f"CI=true: {len(problems)} required test input(s) missing, nothing was run:\n{lines}", returncode=4)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skip is a failure unless the test is marked ``cuda`` or skipped by ``lacks_hardware``."""
    outcome = yield
    report = outcome.get_result()
    if not (strict() and report.skipped) or item.get_closest_marker("cuda") is not None:
        return
    if getattr(report, "wasxfail", None) is not None:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if reason.removeprefix("Skipped: ").startswith(HARDWARE_SKIP):
        return
    report.outcome = "failed"
    report.longrepr = f"CI=true: this test may not skip ({reason})"


def pytest_terminal_summary(terminalreporter):
    """One line per skipped test and its reason, so a shrinking run is seen."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.write_line(f"skips ({len(skipped)}):")
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"SKIP {report.nodeid}: {reason.removeprefix('Skipped: ')}")


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
