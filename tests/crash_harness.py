"""One crash harness for every SIGKILL test: a workload script runs in a child process, the test
kills it at a chosen moment and checks that the kill, not an error of the workload's own, ended it.

A workload that prints ``ready`` once its set-up is done (and ``done`` when its operation ends) is
killed relative to ``ready``, so interpreter start-up never eats the window; one that prints
nothing is killed relative to its start. Then the test reopens what the workload left and checks
its invariants.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


class Workload:
    def __init__(self, script: str, *args, env: dict | None = None, cwd=None):
        self.child = subprocess.Popen([sys.executable, script, *map(str, args)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, **(env or {})})

    def wait_ready(self) -> None:
        line = self.child.stdout.readline()
        if line != "ready\n":
            self.child.kill()
            raise AssertionError(f"the workload did not start: {line!r} {self.child.communicate()[1]}")

    def kill(self) -> tuple[str, str]:
        """SIGKILL now; the workload's output. It was killed or had finished; an error of its own fails."""
        self.child.send_signal(signal.SIGKILL)
        out, err = self.child.communicate()
        assert self.child.returncode in (-signal.SIGKILL, 0), err
        return out, err

    def kill_after(self, delay: float, *, ready: bool = True) -> bool:
        """Kill ``delay`` seconds after ``ready`` (or after the start); True when the kill landed
        before the operation said ``done``."""
        if ready:
            self.wait_ready()
        time.sleep(delay)
        out, _ = self.kill()
        return "done" not in out

    def run_to_the_end(self) -> float:
        """Let the operation finish; seconds from ``ready`` to ``done`` (the window kills are spread
        over, measured in a child because a cold process is slower than the test's)."""
        self.wait_ready()
        started = time.perf_counter()
        assert self.child.stdout.readline() == "done\n"
        duration = time.perf_counter() - started
        self.kill()  # a workload may hold on after "done" (a lock, an open host) as a real process does
        return duration
