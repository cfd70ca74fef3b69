"""Process helpers shared by the tests (and benchmarks/bench_comm.py, soak.py, scripts/comfyui_smoke.py): what is running (read from
/proc), waiting for processes to be gone, running a function without root's permission override,
and starting CPU processes as the ranks of one gloo group."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

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


def status(pid: int) -> dict[str, int]:
    """Resident memory (kB), threads and open file descriptors of `pid` (benchmarks/soak.py too)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def in_unprivileged_child(fn, timeout: float = 60.0) -> str:
    """Run fn() in a forked child without root's permission override (as uid nobody when run
    as root); return its error as "Type: message", or "no error".

    Skips the calling test where root cannot drop to nobody (no CAP_SETUID). fn runs in a fork
    of the test process: keep it to work that needs no new threads (e.g. no torch kernels)."""
    import pytest  # here, not at the top: the benchmarks import this module without pytest

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


def loopback_store() -> dist.TCPStore:
    """A rendezvous store listening on 127.0.0.1 only, on a free port. (A TCPStore that binds its
    own socket listens on every interface, whatever host it is given; the product's ranks use no
    TCPStore at all: a FileStore in a private folder.)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                         master_listen_fd=listener.detach())  # the store owns the socket from here


def start_gloo_ranks(args: list[str], world: int, setup: dict, **popen_kwargs):
    """Start `world` processes `python *args JSON` as the ranks of one gloo group. JSON is `setup`
    plus rank, world and port, the three that join_gloo_group takes. Returns (store, processes):
    keep the store alive until the ranks have joined, it is the group's rendezvous."""
    store = loopback_store()
    procs = [subprocess.Popen([sys.executable, *args, json.dumps(dict(setup, rank=rank, world=world, port=store.port))],
                              **popen_kwargs) for rank in range(world)]
    return store, procs


def start_torchrun_generate(args: list[str], cwd, world: int = 2, **popen_kwargs) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node world -m wan22_core *args`, output captured (text;
    stderr into stdout unless popen_kwargs say otherwise, e.g. stderr=PIPE, env=...). Start it
    before making the one-process reference: it runs meanwhile."""
    options = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd) | popen_kwargs
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(world), "-m", "wan22_core", *args], **options)


def join_gloo_group(rank: int, world: int, port: int) -> None:
    """In a rank started by start_gloo_ranks: one thread (the ranks share the CPUs), then join."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", port, is_master=False),
                            rank=rank, world_size=world)


def run_gloo_worlds(script: str, out_dirs: dict, setup, timeout: float) -> dict[int, list]:
    """One gloo group of `script` per world size in `out_dirs` ({world: folder}), all side by side;
    each rank saves folder/rank{r}.pt. `setup(folder)` is the ranks' setup. Returns {world: [each
    rank's saved result]} once every rank exited cleanly (else fails with their output)."""
    started = {world: start_gloo_ranks([script], world, setup(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True) for world, out in out_dirs.items()}
    results = {}
    for world, (_, procs) in started.items():
        failures = wait_ranks(procs, timeout=timeout)
        assert not failures, "\n".join(failures)
        results[world] = [torch.load(Path(out_dirs[world]) / f"rank{rank}.pt") for rank in range(world)]
    return results


def wait_ranks(procs, timeout: float | None = None) -> list[str]:
    """Wait for every rank (up to `timeout` seconds each); one "rank N failed" line per rank that
    exited non-zero, followed by its output where it was captured (stdout=PIPE)."""
    failures = []
    for rank, proc in enumerate(procs):
        output = proc.communicate(timeout=timeout)[0]
        if proc.returncode:
            failures.append(f"rank {rank} failed" + (f":\n{output}" if output else ""))
    return failures
