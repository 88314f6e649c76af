"""Drive a real Amiga filesystem handler (m68k, under AmiFUSE's emulation) over an image.

Runs in the separate handler virtualenv (cache/handler-venv, ``amifuse`` from PyPI), never
in the project's venv: amifuse pulls ``amitools-amifuse``, which clashes with the
``amitools`` the other tiers use as an oracle.  It imports nothing from amigafuse.

Usage: ``python handler_driver.py IMAGE HANDLER OPS.json OUT.json``

OPS.json is a list of operations, run in order:
  ["write", "/path", "<hex bytes>"]   create or replace a file (FINDOUTPUT + Write)
  ["overwrite", "/path", off, "<hex>"] FINDUPDATE, Seek, Write (in place or past the end)
  ["truncate", "/path", size]         FINDUPDATE, SetFileSize
  ["delete", "/path"]                 DeleteObject
  ["mkdir", "/path"]                  CreateDir
  ["rename", "/from", "/to"]          Rename
  ["flush"]                           nothing but a read-write mount (a pending
                                      transaction is replayed) and a flush at the end
  ["walk"]                            list the whole tree (ExamineNext) and read every file
A read-write mount is used when any operation writes.  OUT.json gets
``{"results": [...], "info": get_disk_info(), "requests": [...the handler's EasyRequests...]}``.
Each walk result maps a path to ``{"type", "size", "protection", "date", "comment", "md5"}``
(date as [days, minutes, ticks]; md5 for files).
The handler's own chatter goes to stdout/stderr; the JSON goes to OUT.json only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

# amifuse imports fusepy, which raises OSError (not ImportError) without libfuse2; we never
# mount through amifuse, so make ``import fuse`` fail as amifuse expects when it is absent.
sys.modules["fuse"] = None  # type: ignore[assignment]

import amifuse.fuse_fs  # type: ignore[import-not-found]  # noqa: E402
from amifuse.fuse_fs import HandlerBridge  # noqa: E402

_bridge_parse_fib = amifuse.fuse_fs._parse_fib


def parse_fib(mem: Any, fib_addr: int) -> dict[str, Any]:
    """The bridge's FileInfoBlock decoding plus fib_Date (132) and fib_Comment (144, BSTR)."""
    entry: dict[str, Any] = _bridge_parse_fib(mem, fib_addr)
    entry["date"] = [mem.r32(fib_addr + 132), mem.r32(fib_addr + 136), mem.r32(fib_addr + 140)]
    raw = bytes(mem.r_block(fib_addr + 144, 80))
    entry["comment"] = raw[1 : 1 + min(raw[0], 79)].decode("latin-1")
    return entry


amifuse.fuse_fs._parse_fib = parse_fib  # list_dir calls it per entry

ST_ROOT, ST_USERDIR, ST_SOFTLINK, ST_LINKDIR = 1, 2, 3, 4
ST_FILE, ST_LINKFILE = -3, -4
TYPE_NAMES = {ST_ROOT: "ROOT", ST_USERDIR: "DIR", ST_SOFTLINK: "SOFTLINK", ST_LINKDIR: "LINKDIR",
              ST_FILE: "FILE", ST_LINKFILE: "LINKFILE"}  # fmt: skip
WALK_LIMIT = 100_000  # objects: a handler that lists a loop must not hang the test


def split(path: str) -> tuple[str, str]:
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent or "/", name


def parent_lock(bridge: Any, parent: str) -> tuple[int, list[int]]:
    lock, _, locks = bridge.locate_path(parent)
    if not lock:
        lock, _ = bridge.locate(0, "")
        locks = [lock] if lock else []
        if parent != "/":
            raise RuntimeError(f"the handler cannot find directory {parent}")
    return lock, locks


def free(bridge: Any, locks: list[int]) -> None:
    for lock in reversed(locks):
        bridge.free_lock(lock)


def walk(bridge: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    todo = ["/"]
    while todo:
        path = todo.pop()
        for entry in bridge.list_dir_path(path):
            if len(out) >= WALK_LIMIT:
                raise RuntimeError(f"more than {WALK_LIMIT} objects listed: a loop?")
            full = path.rstrip("/") + "/" + entry["name"]
            kind = TYPE_NAMES.get(entry["dir_type"], str(entry["dir_type"]))
            rec: dict[str, Any] = {
                "type": kind,
                "size": entry["size"],
                "protection": entry["protection"],
                "date": entry["date"],
                "comment": entry["comment"],
            }
            if entry["dir_type"] in (ST_USERDIR, ST_LINKDIR):
                todo.append(full)
            elif entry["dir_type"] in (ST_FILE, ST_LINKFILE):
                size = entry["size"]
                data = bridge.read_file(full, size, 0) if size else b""
                rec["md5"] = hashlib.md5(data).hexdigest()
                rec["read_bytes"] = len(data)
            out[full] = rec
    return out


def run(bridge: Any, op: list[str]) -> Any:
    verb = op[0]
    if verb == "walk":
        return walk(bridge)
    if verb == "flush":
        return {"ok": True}
    if verb == "write":
        data = bytes.fromhex(op[2])
        opened = bridge.open_file(op[1], 0o1 | 0o100 | 0o1000)  # O_WRONLY | O_CREAT | O_TRUNC
        if opened is None:
            return {"ok": False, "why": f"cannot open {op[1]} for output"}
        fh, dir_lock = opened
        written = bridge.write_handle(fh, data) if data else 0
        bridge.close_file(fh)
        if dir_lock:
            bridge.free_lock(dir_lock)
        return {"ok": written == len(data), "written": written}
    if verb in ("overwrite", "truncate"):
        opened = bridge.open_file(op[1], 0o2)  # O_RDWR: FINDUPDATE
        if opened is None:
            return {"ok": False, "why": f"cannot open {op[1]} for update"}
        fh, dir_lock = opened
        if verb == "overwrite":
            data = bytes.fromhex(op[3])
            done = bridge.write_handle_at(fh, int(op[2]), data)
            ok = done == len(data)
        else:
            done = bridge.set_handle_size(fh, int(op[2]))
            ok = done == int(op[2])
        bridge.close_file(fh)
        if dir_lock:
            bridge.free_lock(dir_lock)
        return {"ok": ok, "result": done}
    if verb == "delete":
        parent, name = split(op[1])
        lock, locks = parent_lock(bridge, parent)
        res1, res2 = bridge.delete_object(lock, name)
        free(bridge, locks)
        return {"ok": bool(res1), "res2": res2}
    if verb == "mkdir":
        parent, name = split(op[1])
        lock, locks = parent_lock(bridge, parent)
        res1, res2 = bridge.create_dir(lock, name)
        if res1:
            bridge.free_lock(res1)
        free(bridge, locks)
        return {"ok": bool(res1), "res2": res2}
    if verb == "rename":
        (sp, sn), (dp, dn) = split(op[1]), split(op[2])
        slock, slocks = parent_lock(bridge, sp)
        dlock, dlocks = parent_lock(bridge, dp)
        res1, res2 = bridge.rename_object(slock, sn, dlock, dn)
        free(bridge, dlocks)
        free(bridge, slocks)
        return {"ok": bool(res1), "res2": res2}
    raise ValueError(f"unknown operation {verb!r}")


def main() -> int:
    image, handler, ops_path, out_path = (Path(a) for a in sys.argv[1:5])
    ops = json.loads(ops_path.read_text())
    writes = any(op[0] != "walk" for op in ops)
    bridge = HandlerBridge(image, handler, read_only=not writes)
    results: list[Any] = []
    try:
        for op in ops:
            results.append(run(bridge, op))
        info = bridge.get_disk_info()
        if writes:
            bridge.flush_volume()
    finally:
        bridge.close()
    out_path.write_text(json.dumps({"results": results, "info": info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
