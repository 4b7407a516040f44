"""bench/host.py, the one provenance helper every result file uses: real processes, real BLAS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import host  # noqa: E402

PROBE = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import host; host.full_strength_blas(); "
         "import numpy, json; print(json.dumps([os.environ.get('OPENBLAS_CORETYPE'), host.blas_kernels()]))")


def _probe(env: dict) -> tuple:
    out = subprocess.run([sys.executable, "-c", "import os; " + PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    core, libs = json.loads(out.stdout.strip().splitlines()[-1])
    return core, [lib.get("architecture") for lib in libs if lib.get("internal_api") == "openblas"]


def test_full_strength_blas_reexecs_without_the_handicap_and_gets_the_native_kernel():
    native_env = host.clean_env()
    _, native = _probe(native_env)
    assert native, "numpy's OpenBLAS not listed by threadpoolctl"
    forced = dict(native_env, OPENBLAS_CORETYPE="Haswell", OPENBLAS_L2_SIZE="1048576")
    # without the helper the variable really does pin the kernel (so the check below can fail) ...
    plain = subprocess.run([sys.executable, "-c", "import numpy, threadpoolctl, json; print(json.dumps("
                            "[l.get('architecture') for l in threadpoolctl.threadpool_info() "
                            "if l.get('internal_api') == 'openblas']))"],
                           env=forced, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(plain.stdout)[0] == "Haswell"
    # ... and with it the process runs without it, on the kernel OpenBLAS picks for this CPU
    core, kernels = _probe(forced)
    assert core is None
    assert kernels == native


def test_provenance_names_commit_cpu_versions_blas_threads_load_and_date():
    import numpy  # noqa: F401
    import torch  # noqa: F401

    rec = host.provenance(load_before=[0.5, 0.4, 0.3])
    assert len(rec["commit"]) == 40 and isinstance(rec["dirty"], bool)
    assert rec["cpu"]["model"] and rec["cpu"]["cores"] == os.cpu_count()
    assert set(rec["cpu"]["features"]) <= set(host.FEATURES)
    assert rec["versions"]["torch"] == torch.__version__ and rec["versions"]["numpy"] == numpy.__version__
    assert any(lib.get("user_api") == "blas" and lib.get("architecture") for lib in rec["blas"])
    assert rec["threads"]["torch"] == torch.get_num_threads()
    assert rec["load_before"] == [0.5, 0.4, 0.3] and "load_average" not in rec
    assert rec["date_utc"].startswith(time.strftime("%Y-", time.gmtime()))


def test_interleave_alternates_sides_and_reports_median_and_range():
    calls = []
    out = host.interleave({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, rounds=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert out["a"]["result"] == 1 and len(out["b"]["runs"]) == 4
    assert out["a"]["min"] <= out["a"]["median"] <= out["a"]["max"]
    with pytest.raises(ValueError, match="at least 3"):
        host.interleave({"a": lambda: 0}, rounds=2)


def test_load_guard_refuses_a_figure_taken_above_the_cores_in_use(tmp_path):
    busy = host.LoadGuard(cores=1)
    busy.before = [busy.cores + 5.0, 0.0, 0.0]
    with pytest.raises(host.HostBusy, match="figure refused"):
        busy.check()
    lax = host.LoadGuard(cores=1, strict=False)
    lax.before = [9.0, 0.0, 0.0]
    assert lax.check()["refused"] is True
    quiet = host.LoadGuard(cores=10_000)
    rec = host.write_result(tmp_path / "r.json", {"figure": 1.5}, guard=quiet, command="bench/x.py")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(rec))
    assert saved["figure"] == 1.5 and saved["load"]["quiet"] is True and saved["command"] == "bench/x.py"
    assert saved["host"]["load_before"] == quiet.before and saved["host"]["load_after"] == quiet.after
