"""Child processes for the multi-process tests: ``python -m factpatch.cli …`` with its output
collected by a thread (to read the port it listens on, and to show its log on failure)."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

LISTENING = re.compile(r"(?:listening on|gRPC on) (\S+):(\d+)")


class Proc:
    """A child process whose output lines are collected by a thread (for the port, and logs)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "factpatch.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.log.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            if m := pattern.search(line):
                return m
        raise AssertionError(f"no {pattern.pattern!r} within {timeout} s:\n{''.join(self.log)}")

    def stop(self, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"did not stop on SIGTERM:\n{''.join(self.log)}") from None
