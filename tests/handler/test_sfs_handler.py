"""SmartFilesystem 1.83 (the real m68k handler) on SFS\\0 volumes amigafuse formatted and filled."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.handler.conftest import Handler
from tests.handler.scenarios import write_read_change

SFS18X_NAME_LIMIT = 100  # SmartFilesystem 1.8x refuses longer names (1.277 takes 107)


@pytest.mark.parametrize("block_size", [512, 1024])
async def test_sfs183_reads_and_writes_our_volume(
    block_size: int, handler_python: Path, sfs183: Handler, tmp_path: Path
) -> None:
    image = tmp_path / f"sfs0_bs{block_size}.hdf"
    facts = await write_read_change(
        handler_python, sfs183, image, "SFS", block_size=block_size,
        name_limit=SFS18X_NAME_LIMIT, hard_links=False, tmp=tmp_path,
    )  # fmt: skip
    # The handler's deletes went to .recycled, as SFS does, and our reader finds them there.
    assert {"f_0005.dat", "size_0065537.bin"} <= set(facts["recycled"]), facts["recycled"]
