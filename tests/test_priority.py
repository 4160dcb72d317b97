"""Process priority applied for real to threads of this process (niceness, I/O class and affinity are
per thread on Linux, so a test thread changes nothing else), oom_score_adj in a child process, and a
refusal in a child without capabilities, which must say what to set in the unit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config.sections import PrioritySettings
from agent.system.priority import (
    apply_inference_priority,
    apply_process_priority,
    current_tid,
    get_io,
    online_cpus,
    process_threads,
    wanted_cpus,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "system"


def in_thread(fn: Callable[[], Any]) -> Any:
    out: dict[str, Any] = {}

    def run() -> None:
        out["v"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["v"]


def thread_nice(tid: int) -> int:
    """Niceness as the kernel reports it (/proc/<pid>/task/<tid>/stat field 19), independently of os.getpriority."""
    text = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[16])


# ------------------------------------------------------------------------------- pure


def test_cpu_sets():
    assert wanted_cpus("all", [0, 1, 2, 3])[0] == [0, 1, 2, 3]
    cpus, note = wanted_cpus("spare_one", [0, 1, 2, 3])
    assert cpus == [1, 2, 3] and "CPU 0 kept free" in note
    cpus, note = wanted_cpus("spare_one", [0, 1])
    assert cpus == [0, 1] and "fewer than 4" in note
    cpus, note = wanted_cpus([1, 3, 9], [0, 1, 2, 3])
    assert cpus == [1, 3] and "not online: [9]" in note
    assert wanted_cpus([7], [0, 1])[0] == [0, 1]
    assert online_cpus(FIXTURES / "pi4-stock/sys") == [0, 1, 2, 3]
    assert online_cpus(FIXTURES / "v2-nolimit-swapfile/sys") == [0, 1]


def test_cpu_list_setting_is_validated():
    assert PrioritySettings(cpus=[3, 1, 3]).cpus == [1, 3]
    with pytest.raises(ValueError):
        PrioritySettings(cpus=[])


# ------------------------------------------------------------------------------- for real, on a thread


def test_process_priority_on_a_thread_is_in_force_and_inherited():
    def body() -> dict[str, Any]:
        tid = current_tid()
        cpu = sorted(os.sched_getaffinity(0))[-1]
        report = apply_process_priority(PrioritySettings(nice=7, io_class="idle", cpus=[cpu], oom_score_adj=int(
            Path("/proc/self/oom_score_adj").read_text())))  # fmt: skip
        child: dict[str, Any] = {}

        def grandchild() -> None:  # a thread started afterwards (what llama.cpp's workers are)
            child["nice"] = thread_nice(current_tid())
            child["cpus"] = sorted(os.sched_getaffinity(0))
            child["io"] = get_io()

        t = threading.Thread(target=grandchild)
        t.start()
        t.join()
        return {"report": report, "nice": thread_nice(tid), "cpus": sorted(os.sched_getaffinity(0)), "child": child,
                "cpu": cpu, "io": get_io()}  # fmt: skip

    main_nice = thread_nice(current_tid())
    r = in_thread(body)
    assert r["report"].ok, r["report"].lines()
    assert r["nice"] == 7 and r["cpus"] == [r["cpu"]] and r["io"] == ("idle", 0)
    assert r["child"] == {"nice": 7, "cpus": [r["cpu"]], "io": ("idle", 0)}
    assert thread_nice(current_tid()) == main_nice  # the test's own thread is untouched
    d = r["report"].as_dict()
    assert d["nice"]["actual"] == 7 and d["io"]["actual"] == "idle" and d["cpus"]["ok"]


def test_inference_threads_get_their_own_niceness():
    def body() -> tuple[int, int]:
        apply_process_priority(PrioritySettings(nice=3, io_class="none", oom_score_adj=int(
            Path("/proc/self/oom_score_adj").read_text())))  # fmt: skip
        report = apply_inference_priority(PrioritySettings(nice=3, inference_nice=12))
        assert report.ok and report.results[0].setting == "inference_nice"
        return thread_nice(current_tid()), apply_inference_priority(
            PrioritySettings(nice=14, inference_nice=None)
        ).results[0].actual

    assert in_thread(body) == (12, 14)  # None: the daemon's niceness


def test_a_change_reaches_threads_that_already_exist():
    ready, done = threading.Event(), threading.Event()
    tids: list[int] = []

    def worker() -> None:
        tids.append(current_tid())
        ready.set()
        done.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    ready.wait(10)
    try:
        assert tids[0] in process_threads()
        report = apply_inference_priority(PrioritySettings(inference_nice=11), tids=tids)
        assert report.ok and thread_nice(tids[0]) == 11
    finally:
        done.set()
        t.join()


# ------------------------------------------------------------------------------- in a child process

_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from agent.config.sections import PrioritySettings
from agent.system.priority import apply_process_priority
r = apply_process_priority(PrioritySettings(**json.loads(sys.argv[1])))
print(json.dumps(r.as_dict()))
"""


def child(settings: dict[str, Any], prefix: list[str] = ()) -> dict[str, Any]:
    p = subprocess.run([*prefix, sys.executable, "-c", _CHILD.format(repo=str(REPO)), json.dumps(settings)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_oom_score_adj_is_raised_in_a_child():
    d = child({"nice": os.getpriority(os.PRIO_PROCESS, 0), "oom_score_adj": 500, "io_class": "none"})
    assert d["oom_score_adj"] == {"wanted": 500, "actual": 500, "ok": True, "note": d["oom_score_adj"]["note"]}


@pytest.mark.root
@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv to drop capabilities"
)
def test_a_refusal_says_why_and_what_to_set_in_the_unit():
    # Without CAP_SYS_NICE lowering niceness is refused (as under the shipped unit's NoNewPrivileges and
    # empty capability set): the report says so and names the unit setting, and nothing raises.
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    here = os.getpriority(os.PRIO_PROCESS, 0)
    d = child({"nice": max(-20, here - 5), "oom_score_adj": 300, "io_class": "best-effort", "io_priority": 6},
              ["nice", "-n", "5", *drop])  # fmt: skip
    assert d["nice"]["ok"] is False and d["nice"]["actual"] == min(19, here + 5)
    assert "CAP_SYS_NICE" in d["nice"]["note"] and "Nice=" in d["nice"]["note"]
    assert d["oom_score_adj"]["ok"] is True and d["io"]["ok"] is True  # raising needs no privilege
