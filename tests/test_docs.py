"""Every example in README.md and docs/*.md runs, as written.

A document is cut into **sections** at its headings (outside code blocks).
Each section that holds examples is one test, run as one session: its
blocks in order, in a fresh directory D under /tmp that is the working
directory and ``$XDG_RUNTIME_DIR`` of everything the section runs, so the
default broker is ``D/brokerq/broker.sock`` and a relative socket path
lands in D. No ``BROKERQ_*`` variable is set, and ``PATH`` starts with the
bin directory of this Python, so ``brokerq`` and ``python`` are the ones
under test. The blocks, by the language of their fence:

- ``python``: executed in the section's Python session, one child process
  (tests/docs_python.py): a block sees the names the section's earlier
  blocks defined, as in a doctest session, and runs as ``__main__``
  code. A block must not raise. Two kinds are not executed there:

  - a block whose first line is a comment naming a file (``# conftest.py``)
    is written to that file in D, for a later command to use;
  - a script (a block with ``if __name__ == "__main__":``) is written to a
    file in D and run as ``python FILE``: it must exit 0.

- ``console``: a terminal transcript. Each ``$ `` line is a command (one
  that ends in a backslash or inside a quote goes on to the next line), run
  in the section's shell (one bash process, with stdin from /dev/null for
  each command), and the lines after it up to the next ``$ `` line are its
  output, stdout and stderr together as a terminal shows them. The output
  must match exactly, except that ``...`` matches any text (doctest's
  ELLIPSIS), for what really varies: pids, times, temporary paths. A
  command must exit 0 unless its line shows its status (``$?``).
- ``sh``: a script, run by bash in D; it must exit 0.

A block right after an HTML comment ``<!-- not run: REASON -->`` is not run
(the test lists it, and the document says why in its text too). Blocks of
any other kind (no language, ``ini``) are diagrams, synopses and
configuration files, not examples.

At the end of a section the Python session and the shell exit (a process
either of them left running is an error), ``brokerq --socket P stop`` stops
the broker of every socket P under D, no broker may remain, and D is
removed.

docs/protocol.md has no Python or console blocks: its examples are the hex
dumps of its section 9 and the worked order of a stream's frames in 5.25,
which tests/test_protocol_doc.py checks; its other blocks are diagrams.
"""

from __future__ import annotations

import contextlib
import difflib
import doctest
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BIN, broker_pids, reap_children

from brokerq.spawn import broker_running

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WORKER = Path(__file__).resolve().parent / "docs_python.py"

#: Fence languages that are examples, and those that are not.
EXAMPLES = {"python", "console", "sh"}
NOT_EXAMPLES = {"", "ini", "text"}  # synopses, unit files, drawings
FENCE = re.compile(r"^```(\S*)\s*$")
HEADING = re.compile(r"^#{1,6} ")
NOT_RUN_MARKER = re.compile(r"^<!-- not run: (.+?) -->$")
FILE_BLOCK = re.compile(r"^# ([\w.-]+\.py)$")
#: Seconds a command, a Python block or a script may take.
TIMEOUT = 30.0


@dataclass
class Block:
    language: str
    line: int  # of the first line of its source, counted from 1
    source: str
    not_run: str | None  # the reason, if it is not run


@dataclass
class Section:
    document: Path
    heading: str
    line: int
    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.document.name}:{self.line}:{self.heading.lstrip('# ')}"


def sections(document: Path) -> list[Section]:
    """The sections of ``document`` that hold fenced blocks of any kind."""
    lines = document.read_text().splitlines()
    found: list[Section] = []
    current = Section(document, "(top)", 1)
    pending_reason: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            source = "\n".join(lines[i + 1 : end]) + "\n"
            current.blocks.append(Block(fence.group(1), i + 2, source, pending_reason))
            pending_reason = None
            i = end + 1
            continue
        if HEADING.match(line):
            if current.blocks:
                found.append(current)
            current = Section(document, line, i + 1)
        elif match := NOT_RUN_MARKER.match(line):
            pending_reason = match.group(1)
        elif line.strip():
            pending_reason = None  # a marker belongs to the block right after it
        i += 1
    if current.blocks:
        found.append(current)
    return found


SECTIONS = [s for d in DOCUMENTS for s in sections(d)]
RUN = [s for s in SECTIONS if any(b.language in EXAMPLES and b.not_run is None for b in s.blocks)]
NOT_RUN = [
    (f"{s.document.name}:{b.line}", b.not_run)
    for s in SECTIONS
    for b in s.blocks
    if b.not_run is not None
]


# -- the section's session ---------------------------------------------------


def section_environment(directory: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERQ_")}
    env["XDG_RUNTIME_DIR"] = directory
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("COLUMNS", None)
    return env


def read_until(fd: int, done: re.Pattern[bytes], timeout: float, what: str) -> bytes:
    """Bytes read from ``fd`` until they match ``done``, bounded in time."""
    deadline = time.monotonic() + timeout
    data = b""
    while not done.search(data):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"{what} did not finish within {timeout} s; output so far:\n"
                + data.decode(errors="replace")
            )
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(
                    f"{what}: the session ended; output:\n" + data.decode(errors="replace")
                )
            data += chunk
    return data


class Session:
    """The directory, shell and Python process of one section."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="bqdoc", dir="/tmp")
        self.env = section_environment(self.directory)
        self.shell: subprocess.Popen[bytes] | None = None
        self.python: subprocess.Popen[bytes] | None = None
        self.python_log = Path(self.directory, ".python.log")
        self.scripts = 0
        self.brokers_before = our_brokers()

    # console

    def command(self, command: str) -> tuple[str, int]:
        """Run one command in the section's shell: its output and exit status."""
        if self.shell is None:
            self.shell = subprocess.Popen(
                ["bash", "--noprofile", "--norc"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=self.env,
                start_new_session=True,
            )
        assert self.shell.stdin is not None
        assert self.shell.stdout is not None
        marker = f"--bqdoc-{os.urandom(6).hex()}--"
        script = f"{{ {command}\n}} < /dev/null\nprintf '\\n{marker} %s\\n' \"$?\"\n"
        self.shell.stdin.write(script.encode())
        self.shell.stdin.flush()
        done = re.compile(rb"\n" + re.escape(marker.encode()) + rb" (\d+)\n$")
        try:
            data = read_until(self.shell.stdout.fileno(), done, TIMEOUT, f"$ {command}")
        except AssertionError:
            kill_group(self.shell.pid)  # the command hangs: end it, and the section
            raise
        match = done.search(data)
        assert match is not None
        return data[: match.start()].decode(errors="replace"), int(match.group(1))

    # python

    def python_block(self, document: Path, block: Block) -> None:
        if self.python is None:
            with self.python_log.open("ab") as log:
                self.python = subprocess.Popen(
                    [sys.executable, str(WORKER)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    cwd=self.directory,
                    env=self.env,
                    start_new_session=True,
                )
        assert self.python.stdin is not None
        assert self.python.stdout is not None
        request = {"file": str(document), "line": block.line - 1, "source": block.source}
        self.python.stdin.write((json.dumps(request) + "\n").encode())
        self.python.stdin.flush()
        what = f"the python block at {document.name}:{block.line}"
        try:
            answer = json.loads(
                read_until(self.python.stdout.fileno(), re.compile(rb"\n$"), TIMEOUT, what)
            )
        except AssertionError as exc:
            kill_group(self.python.pid)  # the block hangs: end it, and the section
            raise AssertionError(f"{exc}\n{self.python_output()}") from None
        if not answer["ok"]:
            raise AssertionError(f"{what} raised:\n{answer['error']}\n{self.python_output()}")

    def python_output(self) -> str:
        text = self.python_log.read_text(errors="replace") if self.python_log.exists() else ""
        return f"its output:\n{text}" if text else "(it printed nothing)"

    def script(self, document: Path, block: Block, *interpreter: str) -> None:
        self.scripts += 1
        suffix = "sh" if interpreter[0] == "bash" else "py"
        path = Path(self.directory, f"example{self.scripts}.{suffix}")
        path.write_text(block.source)
        proc = subprocess.Popen(
            [*interpreter, path.name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            env=self.env,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            output, _ = proc.communicate()
            raise AssertionError(
                f"the script at {document.name}:{block.line} did not finish "
                f"within {TIMEOUT} s; its output:\n{output.decode()}"
            ) from None
        finally:
            left = kill_group(proc.pid)
        text = output.decode(errors="replace")
        assert proc.returncode == 0, (
            f"the script at {document.name}:{block.line} exited "
            f"{proc.returncode}; its output:\n{text}"
        )
        assert not left, f"the script at {document.name}:{block.line} left processes running"

    # the end

    def close(self) -> list[str]:
        """End everything the section started; what was left behind, as errors."""
        problems: list[str] = []
        for proc, name in ((self.python, "the Python session"), (self.shell, "the shell")):
            if proc is None:
                continue
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"{name} did not exit")
            if kill_group(proc.pid):
                problems.append(f"{name} left processes running")
            if proc.stdout is not None:
                proc.stdout.close()
        for lock in Path(self.directory).rglob("*.lock"):
            socket_path = str(lock)[: -len(".lock")]
            stop = subprocess.run(
                [str(BIN / "brokerq"), "--socket", socket_path, "stop"],
                capture_output=True,
                env=self.env,
                timeout=TIMEOUT,
                check=False,
            )
            if stop.returncode != 0:
                problems.append(f"brokerq stop at {socket_path}: {stop.stderr.decode()}")
            if broker_running(socket_path):
                problems.append(f"a broker still holds {lock}")
        for pid, argv in our_brokers().items():
            if pid in self.brokers_before or self.directory in " ".join(argv):
                continue
            problems.append(f"a broker outside {self.directory}: {' '.join(argv)}")
            if len(argv) > 2:
                subprocess.run(
                    [str(BIN / "brokerq"), "--socket", argv[2], "stop"],
                    capture_output=True,
                    env=self.env,
                    timeout=TIMEOUT,
                    check=False,
                )
        left = broker_pids(self.directory)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            problems.append(f"brokers left running: {left}")
        deadline = time.monotonic() + 5
        while broker_pids(self.directory) and time.monotonic() < deadline:
            reap_children()
            time.sleep(0.01)
        reap_children()
        shutil.rmtree(self.directory, ignore_errors=True)
        return problems


def our_brokers() -> dict[int, list[str]]:
    """The brokers (pid: argv) whose parent is this process: the test process
    is a subreaper (conftest.py), so every broker a section spawned is one."""
    found = {}
    for entry in Path("/proc").iterdir():
        stat = _stat(entry.name) if entry.name.isdigit() else None
        if stat is None or int(stat[1]) != os.getpid() or stat[0] in ("Z", "X"):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[1].endswith("local-queue-broker"):
            found[int(entry.name)] = argv
    return found


def kill_group(pgid: int) -> bool:
    """SIGKILL what is left of process group ``pgid``: whether anything was."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    alive = any(
        _pgid_of(entry.name) == pgid and _state_of(entry.name) not in ("Z", "X", None)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
    )
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return alive


def _stat(pid: str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pgid_of(pid: str) -> int | None:
    stat = _stat(pid)
    return int(stat[2]) if stat else None


def _state_of(pid: str) -> str | None:
    stat = _stat(pid)
    return stat[0] if stat else None


# -- console transcripts -----------------------------------------------------


def transcript(source: str) -> Iterator[tuple[str, str]]:
    """The (command, expected output) pairs of a console block."""
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        assert lines[i].startswith("$ "), f"a console block must begin with '$ ': {lines[i]!r}"
        command = lines[i][2:]
        while incomplete(command) and i + 1 < len(lines):
            i += 1
            command += "\n" + lines[i]
        i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        yield command, "\n".join(expected)


def incomplete(command: str) -> bool:
    """Whether the shell reads on past this line: it ends in a backslash, or
    in a quote left open (a string of several lines). Comments and
    backslashes are skipped as bash does; quotes inside ``$(...)`` within
    double quotes pass for the double quotes' own."""
    quote = ""
    i = 0
    while i < len(command):
        char = command[i]
        if quote == "'":
            quote = "" if char == "'" else quote
        elif char == "\\":
            i += 1  # the next character is escaped (a newline too)
        elif quote == '"':
            quote = "" if char == '"' else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1] in " \t\n;"):
            end = command.find("\n", i)
            i = len(command) if end < 0 else end
        i += 1
    return bool(quote) or command.endswith("\\")


CHECKER = doctest.OutputChecker()


def run_console(session: Session, document: Path, block: Block) -> None:
    line = block.line
    for command, expected in transcript(block.source):
        output, status = session.command(command)
        got = output.rstrip("\n")
        where = f"{document.name}:{line}: $ {command}"
        if not CHECKER.check_output(expected + "\n", got + "\n", doctest.ELLIPSIS):
            diff = difflib.unified_diff(
                expected.splitlines(), got.splitlines(), "expected", "got", lineterm=""
            )
            raise AssertionError(f"{where}\n" + "\n".join(diff))
        if "$?" not in command:
            assert status == 0, f"{where}\nexited {status}, output:\n{got}"
        line += command.count("\n") + 1 + (expected.count("\n") + 1 if expected else 0)


# -- the tests ---------------------------------------------------------------


def run_block(session: Session, document: Path, block: Block) -> None:
    if block.language == "console":
        run_console(session, document, block)
    elif block.language == "sh":
        session.script(document, block, "bash", "-e")
    elif (name := FILE_BLOCK.match(block.source.split("\n", 1)[0])) is not None:
        Path(session.directory, name.group(1)).write_text(block.source)
    elif re.search(r"^if __name__ == .__main__.:", block.source, re.MULTILINE):
        session.script(document, block, sys.executable)
    else:
        session.python_block(document, block)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("section", RUN, ids=[s.name for s in RUN])
def test_the_examples_of_a_section_run_as_written(section: Section) -> None:
    session = Session()
    try:
        for block in section.blocks:
            if block.language in EXAMPLES and block.not_run is None:
                run_block(session, section.document, block)
    finally:
        problems = session.close()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("where", "reason"), NOT_RUN, ids=[where for where, _ in NOT_RUN] or None)
def test_a_block_not_run_says_why(where: str, reason: str) -> None:
    assert len(reason) > 20, f"{where}: say why it is not run"
    pytest.skip(f"{where} not run: {reason}")


def test_every_block_is_an_example_or_not_one() -> None:
    # The examples are found at all: a parser that found none would leave
    # test_the_examples_of_a_section_run_as_written with nothing to run.
    assert any(s.document.name == "README.md" for s in RUN), "no example found in README.md"
    for document in DOCUMENTS:
        lines = document.read_text().splitlines()
        markers = [line for line in lines if line.startswith("<!--") and "not run" in line]
        assert all(NOT_RUN_MARKER.match(line) for line in markers), markers
        excluded = [w for w, _ in NOT_RUN if w.startswith(f"{document.name}:")]
        assert len(excluded) == len(markers), f"{document.name}: a marker not just above a block"
    for section in SECTIONS:
        for block in section.blocks:
            where = f"{section.document.name}:{block.line}"
            assert block.language in EXAMPLES | NOT_EXAMPLES, f"{where}: unknown {block.language!r}"
            if block.not_run is not None:
                assert block.language in EXAMPLES, f"{where}: a marker on a non-example"
