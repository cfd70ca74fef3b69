"""Process helpers shared by the tests that check nothing is left running (read from /proc)."""
from pathlib import Path


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
