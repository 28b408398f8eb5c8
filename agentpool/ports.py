"""Is a TCP port free to listen on, and if not, who holds it? Checked before a command starts anything.

``agentpool dev`` run twice used to get as far as replacing the first instance's state and then die
in uvicorn with a traceback. Binding a probe socket first (with ``SO_REUSEADDR``, as uvicorn binds)
answers the question up front; the holder is looked up in ``/proc`` (Linux), where a process's
socket inodes are visible to its own user: ``/proc/net/tcp{,6}`` maps the listening port to an
inode, ``/proc/<pid>/fd`` maps the inode to a process. Elsewhere, or for another user's process,
only the port is named.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def in_use(host: str, port: int) -> str | None:
    """None if ``host:port`` can be listened on; else a one-line description of who holds it."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return f"{host}:{port} cannot be listened on ({e.strerror})"
        else:
            return None
    holder = holder_of(port)
    return f"port {port} on {host} is in use" + (f" by {holder}" if holder else "")


def holder_of(port: int) -> str | None:
    """``pid 123 (agentpool dev --port 8080)`` of the process listening on ``port``, if visible."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in targets:
                    return f"pid {proc.name} ({_command(proc)})"
    return None


def _command(proc: Path) -> str:
    try:
        argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    words = [Path(argv[0].decode(errors="replace")).name] + [a.decode(errors="replace") for a in argv[1:]]
    if words[0].startswith("python"):  # `python .venv/bin/agentpool dev` reads as the user typed it
        if len(words) > 1 and words[1].endswith("agentpool"):
            words = ["agentpool", *words[2:]]
        elif words[1:3] == ["-m", "agentpool"]:
            words = ["agentpool", *words[3:]]
    text = " ".join(words)
    return text if len(text) <= 80 else text[:77] + "..."
