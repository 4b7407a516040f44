"""Issue 26's public check: ``imclass train`` on folders of synthetic photos inside a 2 GiB memory cgroup.

Each command runs in a cgroup of its own with ``memory.limit_in_bytes`` (cgroup v1) or ``memory.max``
(cgroup v2) set to ``--limit`` (default 2 GiB), as a container's limit would be: the tier choice must read
that limit, not the host's free memory. Recorded per command: exit status, wall time, the JSON line
``imclass train`` prints (``accuracy``, ``seconds``, ``data_mode``), the tier lines it printed, the peak of
the process tree's anonymous memory (``RssAnon`` summed over the command and its children, sampled every
0.2 s), the cgroup's own peak (which counts page cache too) and its OOM kills. Needs root (it creates the
cgroups). The photos come from ``bench/data_scale.py`` (``--generate-only``, hard-link trees ``n<N>``).

    python bench/data_scale.py --sizes 10000,30000,100000 --generate-only
    python bench/memory_cap.py --json bench/memory_cap_2gib.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


def make_cgroup(name: str, limit: int) -> tuple[Path, str]:
    """A fresh memory cgroup limited to ``limit`` bytes: (its folder, "v1" or "v2")."""
    if (V1 / "memory.limit_in_bytes").exists():
        group, version = V1 / name, "v1"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
    elif (V2 / "cgroup.controllers").exists() and "memory" in (V2 / "cgroup.controllers").read_text():
        group, version = V2 / name, "v2"
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(limit))
    else:
        raise SystemExit("no cgroup memory controller on this host (cgroup v1 memory/ or v2 with memory)")
    return group, version


def cgroup_figures(group: Path, version: str) -> dict:
    """The cgroup's peak usage (page cache included) and its OOM kills."""
    if version == "v1":
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        oom = (group / "memory.oom_control").read_text().split()
        kills = int(oom[oom.index("oom_kill") + 1]) if "oom_kill" in oom else None
    else:
        peak_file = group / "memory.peak"
        peak = int(peak_file.read_text()) if peak_file.exists() else None
        events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
        kills = int(events.get("oom_kill", 0))
    return {"cgroup_peak_bytes_incl_page_cache": peak, "oom_kills": kills}


def _tree_anon(pid: int) -> int:
    """RssAnon of ``pid`` and all its descendants, in bytes."""
    total, todo = 0, [str(pid)]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                todo += Path(f"/proc/{p}/task/{task}/children").read_text().split()
        except (OSError, StopIteration):
            continue
    return total


def run_capped(command: list[str], limit: int, name: str, timeout: float) -> dict:
    """``command`` inside a new memory cgroup of ``limit`` bytes (killed after ``timeout`` s); its figures."""
    group, version = make_cgroup(name, limit)
    peak = [0]
    start = time.perf_counter()
    proc = subprocess.Popen(["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=host.clean_env())
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_anon(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output, errors = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        output, errors = proc.communicate()
        timed_out = True
    done.set()
    sampler.join()
    lines = output.strip().splitlines()
    said = lines + errors.strip().splitlines()
    result = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    figures = {"command": " ".join(command), "cgroup": version, "limit_bytes": limit, "rc": proc.returncode,
               "timed_out": timed_out, "timeout_s": timeout,
               "wall_s": time.perf_counter() - start, "json": result, "peak_anon_bytes_sampled": peak[0],
               "tier_lines": [line.strip() for line in said if "-> " in line and " tier" in line],
               "tail": said[-6:] if proc.returncode else []}
    figures.update(cgroup_figures(group, version))
    for _ in range(100):  # a killed command's children may take a moment to leave the group
        try:
            group.rmdir()
            break
        except OSError:
            time.sleep(0.1)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/imclass_data_scale", help="bench/data_scale.py's photo trees")
    p.add_argument("--limit", type=int, default=2 << 30, help="memory limit in bytes (default 2 GiB)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a command is killed (recorded)")
    p.add_argument("--json", default=str(ROOT / "bench" / "memory_cap_2gib.json"))
    args = p.parse_args()
    imclass = str(Path(sys.executable).with_name("imclass"))
    root = Path(args.root)
    cases = {
        "transfer_10k": [imclass, "train", str(root / "n10000"), "--json", "--out", "/tmp/imclass_cap/transfer"],
        "keras_cnn_30k": [imclass, "train", str(root / "n30000"), "--model", "keras_cnn", "--image-size", "128",
                          "--epochs", "1", "--json", "--out", "/tmp/imclass_cap/keras_cnn"],
    }
    missing = [str(root / f"n{n}") for n in (10000, 30000) if not (root / f"n{n}").is_dir()]
    if missing:
        raise SystemExit(f"missing photo trees {missing}: python bench/data_scale.py --sizes 10000,30000,100000 "
                         "--generate-only")
    shutil.rmtree("/tmp/imclass_cap", ignore_errors=True)
    guard = host.LoadGuard(strict=False)
    results = {}
    for case, command in cases.items():
        print(f"{case}: {' '.join(command[1:])} (limit {args.limit / 2**30:g} GiB)", flush=True)
        results[case] = run_capped(command, args.limit, f"imclass_cap_{case}_{os.getpid()}", args.timeout)
        r = results[case]
        print(f"  rc {r['rc']}, {r['wall_s']:.0f} s, peak anon {r['peak_anon_bytes_sampled'] / 1e9:.2f} GB, "
              f"cgroup peak {r['cgroup_peak_bytes_incl_page_cache'] / 1e9:.2f} GB, OOM kills {r['oom_kills']}, "
              f"json {json.dumps(r['json'])[:200]}", flush=True)
    host.write_result(args.json, {"limit_bytes": args.limit, "cases": results}, guard=guard)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
