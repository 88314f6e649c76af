"""The real-handler tier: real Amiga filesystem handlers judge the volumes amigafuse writes.

The handlers run under m68k emulation with AmiFUSE's handler bridge (PyPI ``amifuse``).
amifuse pulls ``amitools-amifuse``, which clashes with our ``amitools`` oracle, so it lives
in its own virtualenv, ``cache/handler-venv``, made on first use and kept across runs;
the handler side is a subprocess (``handler_driver.py``) in that venv.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from amigafuse.rdb.scan import scan_bytes
from tests.conftest import CACHE, shared_image

# Pinned: the bridge's API (HandlerBridge and its packet helpers) is not a stable interface.
HANDLER_PACKAGES = (
    "amifuse==0.6.0",
    "amitools-amifuse==0.8.0.post10",
    "machine68k-amifuse==0.4.1.post1",
    "greenlet==3.5.6",
    "fusepy==3.0.1",
)
VENV = CACHE / "handler-venv"
STAMP = VENV / "amigafuse-handler-packages.txt"
DRIVER = Path(__file__).with_name("handler_driver.py")
HANDLER_TIMEOUT_S = 600  # one handler run; a hung emulation fails the test, never hangs CI


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.handler)


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _make_venv() -> Path:
    CACHE.mkdir(exist_ok=True)
    # Two test runs at once (a shared machine) must not build the venv over each other.
    with open(CACHE / "handler-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _make_venv_locked()


def _make_venv_locked() -> Path:
    want = "\n".join(HANDLER_PACKAGES)
    py = _venv_python()
    if py.exists() and STAMP.exists() and STAMP.read_text() == want:
        return py
    if VENV.exists():
        shutil.rmtree(VENV)
    CACHE.mkdir(exist_ok=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.fail(
            f"cannot create the handler virtualenv {VENV} with `{sys.executable} -m venv`:\n"
            f"{made.stderr[-2000:]}\nOn Debian/Ubuntu install python3-venv (bootstrap.sh does).",
            pytrace=False,
        )
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q",
         "--only-binary", "machine68k-amifuse,greenlet", *HANDLER_PACKAGES],
        capture_output=True, text=True,
    )  # fmt: skip
    if pip.returncode != 0:
        shutil.rmtree(VENV, ignore_errors=True)
        if "No matching distribution found for machine68k-amifuse" in pip.stderr:
            pytest.skip(
                f"no machine68k-amifuse wheel for this platform ({platform.machine()}, "
                f"Python {platform.python_version()}): the real handlers cannot be emulated here"
            )
        pytest.fail(
            f"pip could not install the handler tier's packages {' '.join(HANDLER_PACKAGES)} into "
            f"{VENV} (is PyPI reachable?):\n{pip.stderr[-3000:]}",
            pytrace=False,
        )
    STAMP.write_text(want)
    return py


@pytest.fixture(scope="session")
def handler_python() -> Path:
    """The handler venv's interpreter (the venv is created on first use)."""
    return _make_venv()


@dataclass(frozen=True)
class Handler:
    path: Path
    version: str


@pytest.fixture(scope="session")
def sfs183() -> Handler:
    """SmartFilesystem 1.83, extracted (FSHD + LSEG) by our RDB scanner from sfs0_v183.hdf."""
    image = shared_image("handler/sfs0_v183.hdf.gz")
    with open(image, "rb") as f:
        head = f.read(256 * 512)  # cylinders 0-1: the RDB
    layout = scan_bytes(head)
    found = [h for h in layout.filesystems if h.dostype == 0x53465300 and h.complete]
    assert len(found) == 1, (
        f"expected one complete SFS\\0 handler in {image}'s RDB: {layout.filesystems}"
    )
    h = found[0]
    assert h.ver_string is not None and h.ver_string.startswith("SmartFilesystem 1.83"), (
        h.ver_string
    )
    assert h.code[:4] == b"\x00\x00\x03\xf3", "not an AmigaDOS hunk executable"
    out = CACHE / "handlers" / "SmartFilesystem-1.83"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_bytes() != h.code:
        out.write_bytes(h.code)
    return Handler(out, h.ver_string)


@dataclass
class HandlerRun:
    results: list[Any]
    info: dict[str, Any] | None
    output: str  # the handler's stdout and stderr

    @property
    def requests(self) -> list[str]:
        """The EasyRequests the handler showed (vamos logs them as ``-----> EasyRequest '...'``)."""
        found = re.findall(r"-----> EasyRequest '(.*?)'$", self.output, re.S | re.M)
        return [" ".join(text.split()) for text in found]  # one line each


def run_handler(
    python: Path, image: Path, handler: Path, ops: list[list[str]], tmp: Path
) -> HandlerRun:
    """Run ``ops`` (see handler_driver.py) with the real handler on ``image``; fail on a crash."""
    ops_file, out_file = tmp / "ops.json", tmp / "out.json"
    out_file.unlink(missing_ok=True)
    ops_file.write_text(json.dumps(ops))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    try:
        done = subprocess.run(
            [str(python), str(DRIVER), str(image), str(handler), str(ops_file), str(out_file)],
            capture_output=True, text=True, errors="replace", timeout=HANDLER_TIMEOUT_S, env=env, cwd=tmp,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"the real handler did not finish within {HANDLER_TIMEOUT_S} s on {image}: {exc}"
        )
    if done.returncode != 0 or not out_file.exists():
        pytest.fail(
            f"the real handler {handler.name} failed on {image} (exit {done.returncode}):\n"
            f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}",
            pytrace=False,
        )
    got = json.loads(out_file.read_text())
    return HandlerRun(got["results"], got["info"], done.stdout + done.stderr)


@pytest.fixture
def handler_tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
