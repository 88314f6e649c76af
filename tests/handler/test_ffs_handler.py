"""FastFileSystem (the real m68k handler) on DOS\\0-\\7 volumes amigafuse formatted and filled.

No FastFileSystem binary is available to this project today: the pinned ``amifuse`` wheel
(0.6.0, and its sdist) ships ``amifuse/drivers/FastFileSystem`` as a 0-byte placeholder
(its users copy their own from AmigaOS), and none of the shared images stores one in its
RDB.  So the scenario runs only with ``AMIGAFUSE_FFS_HANDLER=/path/to/L/FastFileSystem``;
without it the tests skip and say so, and ``test_pinned_amifuse_ships_no_fastfilesystem``
fails as soon as a pinned wheel does ship one (then these tests use it).  See
docs/handlers.md.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from amigafuse.rdb.scan import find_ver_string
from tests.handler.conftest import VENV, Handler
from tests.handler.scenarios import write_read_change

ENV = "AMIGAFUSE_FFS_HANDLER"
FFS_NAME_LIMIT = 30
LNFS_NAME_LIMIT = 106  # the longest name FastFileSystem 47.4 wrote in ffs_dos7_v47


def shipped_ffs(handler_python: Path) -> Path:
    found = sorted(VENV.glob("lib/python3*/site-packages/amifuse/drivers/FastFileSystem"))
    assert found, f"amifuse/drivers/FastFileSystem not found in {VENV}: the pinned amifuse changed"
    return found[0]


def test_pinned_amifuse_ships_no_fastfilesystem(handler_python: Path) -> None:
    path = shipped_ffs(handler_python)
    size = path.stat().st_size
    assert size == 0, (
        f"the pinned amifuse now ships a FastFileSystem ({size} bytes, "
        f"{find_ver_string(path.read_bytes())!r}): the FFS handler tests run with it; "
        "update docs/handlers.md and this test"
    )


@pytest.fixture(scope="session")
def ffs(handler_python: Path) -> Handler:
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        assert path.is_file() and path.stat().st_size > 0, f"{ENV}={given} is not a handler binary"
    else:
        path = shipped_ffs(handler_python)
        if path.stat().st_size == 0:
            pytest.skip(
                "no FastFileSystem binary: amifuse 0.6.0 ships a 0-byte placeholder and no shared "
                f"image stores one; set {ENV}=/path/to/L/FastFileSystem to run the FFS handler tests"
            )
    code = path.read_bytes()
    assert code[:4] == b"\x00\x00\x03\xf3", f"{path} is not an AmigaDOS hunk executable"
    return Handler(path, find_ver_string(code) or f"FastFileSystem ({path})")


def ffs_version(handler: Handler) -> tuple[int, int]:
    m = re.search(r"(\d+)\.(\d+)", handler.version)
    assert m, f"no version number in {handler.version!r}"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("dos", range(8))
async def test_ffs_reads_and_writes_our_volume(
    dos: int, handler_python: Path, ffs: Handler, tmp_path: Path
) -> None:
    lnfs = dos >= 6
    if lnfs and ffs_version(ffs) < (46, 0):
        pytest.skip(
            f"{ffs.version} does not know DOS\\{dos} (long names came with FastFileSystem 46)"
        )
    await write_read_change(
        handler_python, ffs, tmp_path / f"dos{dos}.hdf", f"DOS{dos}", block_size=512,
        name_limit=LNFS_NAME_LIMIT if lnfs else FFS_NAME_LIMIT, hard_links=True, tmp=tmp_path,
        handler_truncates=dos not in (4, 5),
        info_bytes_per_block=512 - 24 if dos % 2 == 0 else 512,  # OFS: data bytes per block
    )  # fmt: skip
