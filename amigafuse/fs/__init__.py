"""Filesystem engines and the registry that picks one by DosType.

Each engine package (``amigafuse.fs.ffs``, ``amigafuse.fs.sfs``) exposes ``ENGINE``, an
:class:`Engine`.  ``fs`` never imports the driver, the RDB layer or pyfuse3.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.fs.api import Volume


@dataclass
class CheckReport:
    """What ``check`` found.  ``clean`` only when there are no errors left."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.errors


OpenFn = Callable[[BlockDevice, VolumeGeometry, bool], Awaitable[Volume]]
FormatFn = Callable[[BlockDevice, VolumeGeometry, str], Awaitable[None]]
CheckFn = Callable[[BlockDevice, VolumeGeometry, bool], Awaitable[CheckReport]]


@dataclass(frozen=True)
class Engine:
    """A filesystem engine.

    ``open_volume(device, geometry, read_only)``: the device is the partition window.
    ``format_volume(device, geometry, label)``: writes an empty filesystem of
    ``geometry.dostype``.  ``check_volume(device, geometry, repair)``: a CheckReport.
    """

    name: str
    dostypes: frozenset[int]
    open_volume: OpenFn
    format_volume: FormatFn
    check_volume: CheckFn


# Engine packages in the order they are asked.  A package listed here that is not
# installed is skipped; an installed one that fails to import is an error.
ENGINE_MODULES: tuple[str, ...] = ("amigafuse.fs.ffs", "amigafuse.fs.sfs")


def engines() -> list[Engine]:
    found = []
    for name in ENGINE_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        engine = getattr(module, "ENGINE", None)
        if isinstance(engine, Engine):  # a package still being written exports none yet
            found.append(engine)
    return found


def engine_for(dostype: int) -> Engine | None:
    """The engine that handles ``dostype``, or None."""
    for engine in engines():
        if dostype in engine.dostypes:
            return engine
    return None
