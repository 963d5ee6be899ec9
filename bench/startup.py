"""Start-up: the cold first put that spawns a broker, a warm CLI put, and what imports load.

    .venv/bin/python bench/startup.py [--quick] [--runs N]

Measures (issue 8 targets in brackets), each over N runs (10; 3 with
``--quick``), every cold run with a fresh socket directory of its own
(``tempfile.mkdtemp(dir="/tmp")``), medians and maxima:

* **cold, API**: ``brokerq.connect(path)`` plus one ``put`` in this process,
  with no broker running, so the connect spawns one (default options: the
  journal beside the socket, ``--fsync batch``) [< 0.25 s]. The time until
  the broker said ``READY`` is shown too (the rest is the broker importing
  trio and starting to serve, then the hello and the put).
* **cold, CLI**: ``brokerq --socket S put q x`` as a new process, no broker
  running: the interpreter's start, the CLI's imports and the spawn [< 0.25 s].
* **warm, CLI**: the same command with the broker already running, against
  ``python -c "import click, msgspec"``, interleaved [no slower].
* **imports**: whether ``import brokerq`` and ``import brokerq.client.blocking``, each
  in a clean interpreter, load trio, anyio or click [neither trio nor anyio;
  no click for ``brokerq.client.blocking``].

Every broker started here is stopped (``stop``; by its pid if it does not
answer) and every directory removed, also on an error or Ctrl-C. The
spawned brokers get ``BROKERQ_IDLE_EXIT=60`` so that even one left behind by
a killed run goes by itself; other ``BROKERQ_*`` variables are removed
(but ``BROKERQ_BROKER``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import brokerq
from brokerq import spawn

BIN = os.path.dirname(sys.executable)
BROKERQ_CLI = os.path.join(BIN, "brokerq")
COLD_TARGET_S = 0.25


class Dirs:
    """The socket directories made here; each one's broker is stopped on cleanup."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def new(self) -> str:
        directory = tempfile.mkdtemp(prefix="bqs", dir="/tmp")
        self.made.append(directory)
        return os.path.join(directory, "s")

    def release(self, socket_path: str) -> None:
        stop_broker(socket_path)
        directory = os.path.dirname(socket_path)
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(ValueError):
            self.made.remove(directory)

    def release_all(self) -> None:
        for directory in list(self.made):
            self.release(os.path.join(directory, "s"))


def stop_broker(socket_path: str) -> None:
    """Stop the broker of ``socket_path`` if one runs: ``stop``, else its pid."""
    if not spawn.broker_running(socket_path):
        return
    with contextlib.suppress(brokerq.BrokerqError), brokerq.Client(socket_path, 5.0) as client:
        client.stop()
    deadline = time.monotonic() + 5
    while spawn.broker_running(socket_path):
        pid = spawn.lock_holder_pid(socket_path)
        if pid:
            sig = signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        time.sleep(0.05)


def clean_environment() -> dict[str, str]:
    """This process's environment for brokers and CLIs: no BROKERQ_* but the
    idle exit (and BROKERQ_BROKER, which names the program, to compare two
    versions), and no PYTHONDONTWRITEBYTECODE (an installed package has its
    .pyc files; without them every run would compile the modules again)."""
    for key in [k for k in os.environ if k.startswith("BROKERQ_") and k != "BROKERQ_BROKER"]:
        del os.environ[key]
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["BROKERQ_IDLE_EXIT"] = "60"
    return dict(os.environ)


def cold_api(dirs: Dirs) -> tuple[float, float]:
    """One cold connect + put in this process: (seconds to READY, seconds in all)."""
    socket_path = dirs.new()
    ready_at: list[float] = []
    wait_ready = spawn._wait_ready

    def timed_wait_ready(fd: int, deadline: float, socket_path: str) -> int:
        pid = wait_ready(fd, deadline, socket_path)
        ready_at.append(time.perf_counter())
        return pid

    spawn._wait_ready = timed_wait_ready
    try:
        start = time.perf_counter()
        client = brokerq.connect(socket_path)
        client.queue("q").put(b"x")
        total = time.perf_counter() - start
        client.close()
    finally:
        spawn._wait_ready = wait_ready
        dirs.release(socket_path)
    return (ready_at[0] - start if ready_at else float("nan")), total


def run_timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def cold_cli(dirs: Dirs, env: dict[str, str]) -> float:
    socket_path = dirs.new()
    try:
        return run_timed([BROKERQ_CLI, "--socket", socket_path, "put", "q", "x"], env)
    finally:
        dirs.release(socket_path)


def warm_cli(dirs: Dirs, env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Interleaved: the warm CLI put, and ``python -c "import click, msgspec"``."""
    socket_path = dirs.new()
    put = [BROKERQ_CLI, "--socket", socket_path, "put", "q", "x"]
    baseline = [sys.executable, "-c", "import click, msgspec"]
    cli_times: list[float] = []
    base_times: list[float] = []
    try:
        run_timed(put, env)  # spawns the broker: not counted
        run_timed(baseline, env)
        for _ in range(runs):
            cli_times.append(run_timed(put, env))
            base_times.append(run_timed(baseline, env))
    finally:
        dirs.release(socket_path)
    return cli_times, base_times


def loaded_modules(module: str, env: dict[str, str]) -> list[str]:
    """Which of trio, anyio, click a clean interpreter has loaded after ``import module``."""
    code = (
        f"import sys, {module}; "
        "print(' '.join(m for m in ('trio', 'anyio', 'click') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.split()


def row(label: str, times: list[float], target: str = "") -> str:
    return (
        f"{label:<34} {statistics.median(times) * 1000:8.1f} {max(times) * 1000:8.1f}"
        f" {min(times) * 1000:8.1f}  {target}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs of each, not 10")
    parser.add_argument("--runs", type=int, help="runs of each measurement")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 10)
    env = clean_environment()
    dirs = Dirs()
    try:
        # Warm-ups, not counted: disk caches, .pyc files, this process's first connect.
        cold_api(dirs)
        cold_cli(dirs, env)
        ready: list[float] = []
        api: list[float] = []
        cli: list[float] = []
        for _ in range(runs):  # interleaved, so that the machine's noise hits both alike
            to_ready, total = cold_api(dirs)
            ready.append(to_ready)
            api.append(total)
            cli.append(cold_cli(dirs, env))
        warm, base = warm_cli(dirs, env, runs)
    finally:
        dirs.release_all()

    print(f"start-up, {runs} runs each (ms)       median      max      min")
    print(row("cold: spawn until READY", ready))
    print(row("cold: connect() + put, API", api, _verdict(api, COLD_TARGET_S)))
    print(row("cold: brokerq put (CLI process)", cli, _verdict(cli, COLD_TARGET_S)))
    ratio = statistics.median(warm) / statistics.median(base)
    print(row("warm: brokerq put (CLI process)", warm, f"{ratio:.2f}x the baseline"))
    print(row('python -c "import click, msgspec"', base, "baseline"))
    verdict = "met" if ratio <= 1.0 else "missed"
    print(f"warm CLI put no slower than the baseline: {verdict} ({ratio:.2f}x)")
    for module in ("brokerq", "brokerq.client.blocking"):
        loaded = loaded_modules(module, env)
        print(f"import {module:<15} loads: {', '.join(loaded) or 'none'} of trio, anyio, click")


def _verdict(times: list[float], target: float) -> str:
    median = statistics.median(times)
    return f"target < {target * 1000:.0f}: {'met' if median < target else 'missed'} (median)"


if __name__ == "__main__":
    main()
