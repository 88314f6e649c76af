"""AmigaDOS DateStamps: days since 1978-01-01, minutes since midnight, ticks (1/50 s).

amigafuse treats Amiga dates as UTC, as amitools, ADFlib and Linux affs (without its
``tz`` option) do.
"""

from __future__ import annotations

from dataclasses import dataclass

AMIGA_EPOCH_UNIX = 252460800  # 1978-01-01T00:00:00Z in Unix seconds
TICKS_PER_SECOND = 50


@dataclass(frozen=True, order=True)
class DateStamp:
    days: int
    minutes: int
    ticks: int

    @classmethod
    def from_unix_ns(cls, ns: int) -> DateStamp:
        """Nearest representable stamp at or below ``ns``; clamped to 0 and 2**32-1 days."""
        total_ticks = (ns - AMIGA_EPOCH_UNIX * 1_000_000_000) * TICKS_PER_SECOND // 1_000_000_000
        if total_ticks < 0:
            return cls(0, 0, 0)
        days, rest = divmod(total_ticks, 86400 * TICKS_PER_SECOND)
        minutes, ticks = divmod(rest, 60 * TICKS_PER_SECOND)
        if days > 0xFFFFFFFF:
            return cls(0xFFFFFFFF, 1439, 2999)
        return cls(days, minutes, ticks)

    @classmethod
    def from_unix(cls, seconds: float) -> DateStamp:
        return cls.from_unix_ns(round(seconds * 1_000_000_000))

    def to_unix_ns(self) -> int:
        """Unix time in ns.  Out-of-range minutes/ticks (corrupt disks) are taken as they add up."""
        total_ticks = (self.days * 1440 + self.minutes) * 60 * TICKS_PER_SECOND + self.ticks
        return AMIGA_EPOCH_UNIX * 1_000_000_000 + total_ticks * (1_000_000_000 // TICKS_PER_SECOND)

    def to_unix(self) -> float:
        return self.to_unix_ns() / 1_000_000_000

    @classmethod
    def from_seconds_since_1978(cls, seconds: int) -> DateStamp:
        """SFS stores whole seconds since the Amiga epoch."""
        days, rest = divmod(seconds, 86400)
        return cls(days, rest // 60, (rest % 60) * TICKS_PER_SECOND)

    def to_seconds_since_1978(self) -> int:
        return (self.days * 1440 + self.minutes) * 60 + self.ticks // TICKS_PER_SECOND
