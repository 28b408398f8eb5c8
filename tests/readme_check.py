"""Run a Markdown file's shell and Python blocks in order, as a reader would, and compare outputs.

Used by ``tests/test_readme.py`` on README.md. What it does with each fenced block:

- ``console``: each ``$ command`` (a trailing ``\\`` continues it on the next line) runs in one
  bash session kept for the whole file, so ``export`` and ``rid=$(...)`` carry over as in a
  terminal. It must exit 0 and print no traceback; its output must have the *shape* of the lines
  shown under it (see :func:`mismatch`).
- ``python``: written to a file and run with the venv's interpreter; exit 0, no traceback.
- ``text`` right after a background command or a python block: that one's output, by shape.
- ``toml``: must parse.

A :class:`Rule` changes how one command runs: ``background`` (it runs until stopped, as
``scripts/dev`` in a terminal of its own: started, then waited for on its gateway's
``/v1/pools`` until every replica is ready) or ``skip`` (with the reason, printed).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Command:
    text: str  # what the reader types, continuation lines joined with a newline
    shown: list[str]  # the output the file shows under it
    line: int  # 1-based line in the file


@dataclass
class Block:
    lang: str
    line: int  # the opening fence's line
    body: str
    commands: list[Command] = field(default_factory=list)


def blocks(markdown: str) -> list[Block]:
    """The fenced blocks of ``markdown``, console blocks split into commands."""
    out: list[Block] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        block = Block(lang, start + 1, "\n".join(body))
        if lang == "console":
            block.commands = _commands(body, start + 2)
        out.append(block)
    return out


def _commands(body: list[str], first_line: int) -> list[Command]:
    cmds: list[Command] = []
    j = 0
    while j < len(body):
        if not body[j].startswith("$ "):
            if cmds:
                cmds[-1].shown.append(body[j])
            j += 1
            continue
        line_no, parts = first_line + j, [body[j][2:]]
        while parts[-1].endswith("\\") and j + 1 < len(body):
            j += 1
            parts.append(body[j])
        cmds.append(Command("\n".join(parts), [], line_no))
        j += 1
    return cmds


# --- shapes


def mismatch(shown: list[str], actual: str, *, ordered: bool = True) -> str | None:
    """Why ``actual`` does not have the shape of ``shown``, or None.

    Every shown line (a line starting ``...`` stands for lines left out) must match an actual line, in order
    unless ``ordered`` is false (log lines of concurrent processes). A line that holds JSON matches
    JSON with the same keys (nested objects too; values may differ); other lines match with every
    number, hex id and run of spaces generalised, and ``…`` standing for anything.
    """
    got = [ln for ln in actual.splitlines() if ln.strip()]
    pos = 0
    for want in shown:
        if not want.strip() or want.strip().startswith("..."):  # `...` or `... (21 more chunks)`
            continue
        start = pos if ordered else 0
        for k in range(start, len(got)):
            if line_matches(want, got[k]):
                pos = k + 1
                break
        else:
            return f"no output line has the shape of {want!r}"
    return None


def line_matches(want: str, got: str) -> bool:
    brace = want.find("{")
    if brace >= 0 and want.rstrip().endswith("}"):
        head, body = want[:brace], want[brace:]
        try:
            shown: object = json.loads(body)
        except ValueError:  # shown with `...` inside: every key it names must be there
            shown = set(re.findall(r'"(\w+)":', body)) or None
        if shown is not None:
            got_brace = got.find("{")
            if got_brace < 0 or not _pattern(head).fullmatch(got[:got_brace].rstrip()):
                return False
            try:
                actual = json.loads(got[got_brace:])
            except ValueError:
                return False
            if isinstance(shown, set):
                return shown <= set(_keys(actual))
            return same_shape(shown, actual)
    return bool(_pattern(want).fullmatch(got.rstrip()))


def same_shape(want: object, got: object) -> bool:
    if want is None or got is None:
        return True
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and set(want) == set(got)
            and all(same_shape(v, got[k]) for k, v in want.items())
        )
    if isinstance(want, list):
        return isinstance(got, list) and (not want or not got or same_shape(want[0], got[0]))
    if isinstance(want, bool) or isinstance(got, bool):
        return type(want) is type(got)
    if isinstance(want, int | float):
        return isinstance(got, int | float)
    return type(want) is type(got)


def _keys(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v)


# An HTTP date's weekday and month vary like its numbers: `date: Thu, 03 Dec 2026 09:32:18 GMT`
_DAY = r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun|Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)\b"
_TOKEN = re.compile(rf"…|{_DAY}|[0-9a-f]*\d[0-9a-f]*|\s+")


def _pattern(shown: str) -> re.Pattern[str]:
    out, last = [], 0
    for m in _TOKEN.finditer(shown.rstrip()):
        out.append(re.escape(shown[last : m.start()]))
        tok = m.group(0)
        if tok == "…":
            out.append(r".*")
        elif tok.isspace():
            out.append(r"\s+")
        elif tok.isalpha():
            out.append(_DAY)
        else:
            out.append(r"[0-9a-f.]+")
        last = m.end()
    out.append(re.escape(shown.rstrip()[last:]))
    return re.compile("".join(out))


# --- running


@dataclass(frozen=True)
class Rule:
    """How to run the command that starts with ``command`` (after ``$ ``)."""

    command: str
    action: str  # background | skip
    reason: str = ""
    port: int | None = None  # background: the gateway port to wait on


class Failure(AssertionError):
    pass


class Shell:
    """One bash session, fed commands one at a time; each command's output and exit status."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its process group holds everything the file starts
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.background: list[int] = []

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def run(self, command: str, timeout_s: float) -> tuple[int, str]:
        token = f"__readme_{secrets.token_hex(8)}__"
        assert self.proc.stdin is not None
        # stdin from /dev/null: a command must not read the lines meant for the shell
        self.proc.stdin.write(f"{{ {command}\n}} < /dev/null\nprintf '\\n{token} %d\\n' $?\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise Failure(f"timed out after {timeout_s:.0f} s: {command}\n{''.join(out)}") from None
            if line is None:
                raise Failure(f"the shell exited during: {command}\n{''.join(out)}")
            if line.startswith(token):
                text = "".join(out)
                return int(line.split()[1]), text[:-1] if text.endswith("\n") else text
            out.append(line)

    def last_pid(self) -> int:
        _rc, out = self.run("echo $!", 5)
        return int(out.strip())

    def start(self, command: str, log: Path) -> int:
        """Start one simple command in the background (its ``# comment`` dropped); its pid."""
        command = re.sub(r"\s+#.*$", "", command)
        rc, out = self.run(f"{command} > {log} 2>&1 &", 10)
        if rc != 0:
            raise Failure(f"could not start: {command}\n{out}")
        pid = self.last_pid()
        self.background.append(pid)
        return pid

    def stop(self, pid: int, timeout_s: float = 40) -> None:
        """SIGTERM (what Ctrl-C does to ``agentpool dev``: drain, then exit), then wait for it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if pid in self.background:
            self.background.remove(pid)

    def close(self) -> None:
        for pid in list(self.background):
            self.stop(pid)
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything the file left running
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_pools_ready(port: int, log: Path, pid: int, timeout_s: float) -> None:
    """Until the gateway on ``port`` answers and every pool's desired replicas are ready (a
    pre-warmed pool desires its replicas from the start)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not alive(pid):
            raise Failure(f"exited before it was ready:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/pools", timeout=2) as r:
                pools = json.loads(r.read())["pools"]
            last = json.dumps(pools)
            if all(d["ready"] >= d["desired"] for p in pools for d in p["deployments"]):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise Failure(f"pools not ready in {timeout_s:.0f} s: {last}\n{log.read_text()}")


@dataclass
class Report:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (where: what, output), in order


def run_file(
    path: Path,
    *,
    cwd: Path,
    env: dict[str, str],
    rules: list[Rule],
    substitutions: dict[str, str],
    python: str,
    workdir: Path,
    timeout_s: float = 60,
    report: Report | None = None,
) -> Report:
    """Run ``path``'s blocks in order; raise :class:`Failure` naming the line of the first problem.

    ``substitutions`` rewrite the commands (and python blocks) first (e.g. the port 8080 to a free one).
    """
    report = Report() if report is None else report
    shell = Shell(cwd, env)
    devs: list[int] = []  # background `agentpool dev`s: one runs at a time, as one port allows
    # (what, its output, its log if it still runs) a following ``text`` block shows
    pending: tuple[str, str, Path | None] | None = None
    name = str(path.relative_to(cwd)) if path.is_relative_to(cwd) else path.name
    logs: list[tuple[str, Path]] = []  # (where: command, log) of what ran in the background
    try:
        for n, block in enumerate(blocks(path.read_text(encoding="utf-8"))):
            where = f"{name}:{block.line}"
            if block.lang == "text":
                if pending is not None:
                    what, out, log = pending
                    problem = mismatch(block.body.splitlines(), out, ordered=False)
                    deadline = time.monotonic() + 10
                    while problem and log is not None and time.monotonic() < deadline:  # still writing
                        time.sleep(0.1)
                        out = log.read_text()
                        problem = mismatch(block.body.splitlines(), out, ordered=False)
                    if problem:
                        raise Failure(f"{where}: output of {what}: {problem}\n--- got:\n{out}")
                pending = None
                continue
            pending = None
            if block.lang == "toml":
                try:
                    tomllib.loads(block.body)
                except tomllib.TOMLDecodeError as e:
                    raise Failure(f"{where}: not valid TOML: {e}") from None
                continue
            if block.lang == "python":
                script = workdir / f"block{n}.py"
                body = block.body
                for old, new in substitutions.items():  # the same port as the commands use
                    body = body.replace(old, new)
                script.write_text(body + "\n", encoding="utf-8")
                rc, out = shell.run(f"{python} {script}", timeout_s)
                report.outputs.append((f"{where}: python block", out))
                _check(where, "the python block", rc, out)
                report.ran.append(f"{where}: python block")
                pending = ("the python block", out, None)
                continue
            for cmd in block.commands:
                where = f"{name}:{cmd.line}"
                text = cmd.text
                for old, new in substitutions.items():
                    text = text.replace(old, new)
                rule = next((r for r in rules if cmd.text.startswith(r.command)), None)
                if rule is not None and rule.action == "skip":
                    report.skipped.append(f"{where}: {cmd.text} ({rule.reason})")
                    continue
                starts_dev = re.search(r"(scripts/dev|agentpool dev)\b", cmd.text) is not None
                if starts_dev:  # the reader stops the running one first (Ctrl-C), as the file says
                    for pid in devs:
                        shell.stop(pid)
                    devs.clear()
                if rule is not None and rule.action == "background":
                    log = workdir / f"background{n}-{cmd.line}.log"
                    pid = shell.start(text, log)
                    devs.append(pid)
                    logs.append((f"{where}: {cmd.text}", log))
                    assert rule.port is not None
                    wait_pools_ready(rule.port, log, pid, timeout_s)
                    out = log.read_text()
                    if TRACEBACK in out:
                        raise Failure(f"{where}: {cmd.text} printed a traceback:\n{out}")
                    report.ran.append(f"{where}: {cmd.text} (in the background)")
                    report.outputs.append((f"{where}: {cmd.text}", out))
                    pending = (cmd.text, out, log)
                    continue
                rc, out = shell.run(text, timeout_s)
                if text.rstrip().endswith("&"):
                    pid = shell.last_pid()
                    shell.background.append(pid)
                    if starts_dev:
                        devs.append(pid)
                report.outputs.append((f"{where}: {cmd.text}", out))
                _check(where, cmd.text, rc, out)
                problem = mismatch(cmd.shown, out)
                if problem:
                    raise Failure(f"{where}: {cmd.text}: {problem}\n--- got:\n{out}")
                report.ran.append(f"{where}: {cmd.text}")
    finally:
        shell.close()
    for what, log in logs:  # stopped as Ctrl-C stops them: that must be clean too
        if TRACEBACK in log.read_text():
            raise Failure(f"{what} printed a traceback (by the time it stopped):\n{log.read_text()}")
    return report


def _check(where: str, what: str, rc: int, out: str) -> None:
    if rc != 0:
        raise Failure(f"{where}: {what} exited {rc}:\n{out}")
    if TRACEBACK in out:
        raise Failure(f"{where}: {what} printed a traceback:\n{out}")
