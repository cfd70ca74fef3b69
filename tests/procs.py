"""Process helpers shared by the tests: what is running (read from /proc), waiting for processes
to be gone, and running a function without root's permission override."""
import os
import signal
import time
from pathlib import Path

import pytest

NOBODY = 65534  # the conventional unprivileged uid; setuid needs no passwd entry for it


def children_of(pid: int) -> set[int]:
    """Live (non-zombie) child process ids of `pid`."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def process_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie has exited (its parent may not have reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def assert_all_gone(pids, within: float = 10.0, message: str = "worker processes left behind") -> None:
    """Wait up to `within` seconds for every process in `pids` to exit, then assert they have."""
    deadline = time.monotonic() + within
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if process_alive(p)]
    assert not left, f"{message}: {left}"


def in_unprivileged_child(fn, timeout: float = 60.0) -> str:
    """Run fn() in a forked child without root's permission override (as uid nobody when run
    as root); return its error as "Type: message", or "no error".

    Skips the calling test where root cannot drop to nobody (no CAP_SETUID). fn runs in a fork
    of the test process: keep it to work that needs no new threads (e.g. no torch kernels)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any of the parent's cleanup
        try:
            os.close(read)
            try:
                if os.geteuid() == 0:
                    os.setgid(NOBODY)
                    os.setgroups([])
                    os.setuid(NOBODY)  # file permissions apply again
            except OSError as err:
                result = f"cannot drop root: {err}"
            else:
                try:
                    fn()
                    result = "no error"
                except BaseException as err:
                    result = f"{type(err).__name__}: {err}"
            os.write(write, result.encode())
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            raise AssertionError(f"the unprivileged child ran past {timeout} s")
        time.sleep(0.01)
    with os.fdopen(read, "rb") as f:
        result = f.read().decode()
    if result.startswith("cannot drop root"):
        pytest.skip(result)
    return result
