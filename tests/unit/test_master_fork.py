"""What a worker inherits at fork: the master's objects, frozen out of its collections."""

from __future__ import annotations

import gc
import json
import os

from amavisd import config as configuration
from amavisd import master


def test_a_worker_never_collects_what_it_inherits_and_the_master_still_does(monkeypatch):
    """gc.freeze() before the fork: the worker's collections never write to
    the inherited objects' GC headers (their pages stay shared) nor walk
    them; the master thaws at once, so its own garbage is still collected."""
    report_r, report_w = os.pipe()
    inherited = [{"shared": n} for n in range(1000)]  # containers the master made before the fork

    class Worker:  # what the child runs instead of a real worker: it reports and leaves
        def __init__(self, *args: object) -> None:
            pass

        def run(self) -> None:
            frozen = gc.get_freeze_count()
            gc.collect()
            mine = gc.get_objects()
            os.write(report_w, json.dumps({
                "frozen": frozen,
                "collected_inherited": any(obj is inherited for obj in mine),
            }).encode())

    monkeypatch.setattr(master, "Worker", Worker)
    arbiter = master.Arbiter(configuration.load(None, {}), listeners=[])
    arbiter._wakeup_r, arbiter._wakeup_w = os.pipe()  # what install_signals() opens
    try:
        pid = arbiter.spawn_worker()
        assert gc.get_freeze_count() == 0  # the master thawed: it collects everything
        _, status = os.waitpid(pid, 0)
        report = json.loads(os.read(report_r, 4096))
    finally:
        for fd in (report_r, report_w, arbiter._wakeup_r, arbiter._wakeup_w):
            os.close(fd)
        for worker in arbiter.workers.values():
            worker.heartbeat.close()
        arbiter.doorman.close()
    assert report["frozen"] >= len(inherited)
    assert not report["collected_inherited"]  # not among the objects its collections visit
    assert os.waitstatus_to_exitcode(status) == 1  # spawn_worker's os._exit after run()
