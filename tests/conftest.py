"""Shared test fixtures: paths to the shared real images, and tool availability."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Shared machines are slow and noisy: no per-example deadlines.  CI runs a moderate
# number of examples; HYPOTHESIS_PROFILE=thorough for long local runs.
settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parent.parent
SHARED_IMAGES = REPO.parent / "shared" / "images"
REAL = SHARED_IMAGES / "real"
HANDLER = SHARED_IMAGES / "handler"
CACHE = REPO / "cache"


def shared_image(relpath: str) -> Path:
    """Path to ``shared/images/<relpath>``; a ``.gz`` is unpacked once into ``cache/``.

    Skips the test (with the reason) when shared/ is absent, as on a user's machine
    that has only the repository; CI always has it.
    """
    src = SHARED_IMAGES / relpath
    if not src.exists():
        pytest.skip(f"shared test image {src} is not present (shared/ is beside the repo in CI)")
    if src.suffix != ".gz":
        return src
    CACHE.mkdir(exist_ok=True)
    dst = CACHE / src.name[: -len(".gz")]
    if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
        tmp = dst.with_suffix(".tmp")
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        tmp.replace(dst)
    return dst


@pytest.fixture
def image_copy(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``image_copy("handler/x.hdf.gz")`` -> a writable private copy of a shared image."""

    def make(relpath: str) -> Path:
        src = shared_image(relpath)
        dst = tmp_path / src.name
        shutil.copyfile(src, dst)
        return dst

    return make
