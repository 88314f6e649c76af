"""Size parsing and formatting shared by the commands (amigafuse.sources)."""

from __future__ import annotations

import pytest

from amigafuse.errors import UsageError
from amigafuse.sources import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [("64M", 64 << 20), ("64MiB", 64 << 20), ("1g", 1 << 30), ("512K", 512 << 10), ("1000", 1000),
     ("1.5M", 3 << 19), (" 2T ", 2 << 40), ("3MB", 3 << 20)],
)  # fmt: skip
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_rest_and_errors() -> None:
    assert parse_size("rest", allow_rest=True) is None
    with pytest.raises(UsageError, match="last partition"):
        parse_size("REST")
    for bad in ("", "M", "-1M", "0", "12X", "1..2M"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(3 << 20) == "3.0 MiB"
    assert format_size(5 * (1 << 40)) == "5.0 TiB"
