"""Fixtures for the VFIO tests: a Linux guest under QEMU TCG (scripts/vm/guest.py).

``run_in_guest(cmd, images=..., controllers=...) -> GuestResult(rc, stdout, stderr, ...)``
boots the guest (about 3-7 s here), runs ``cmd`` as root in the repository directory and
powers off.  Tests are skipped only when qemu-system-x86_64 is missing; every other
failure to build or boot the guest is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from scripts.vm.guest import GuestResult, qemu_available, run_in_guest


@pytest.fixture
def guest() -> Callable[..., GuestResult]:
    """``guest(cmd, **kwargs)`` is :func:`scripts.vm.guest.run_in_guest`."""
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")

    def run(cmd: str, **kwargs: Any) -> GuestResult:
        return run_in_guest(cmd, **kwargs)

    return run
