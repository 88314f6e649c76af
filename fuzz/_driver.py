"""Running a harness: under atheris when it is installed, else a plain random loop.

``python fuzz/<harness>.py [libFuzzer options] [corpus dirs or crash files]`` runs
atheris (libFuzzer); ``python fuzz/<harness>.py --random N [--seed S]`` runs N random
inputs without coverage guidance (useful where atheris is not installed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

try:
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError:  # the fuzz extra is optional
    atheris = None

OneInput = Callable[[Any], None]
HARNESSES = ("ffs_read.py", "sfs_read.py", "rdb_scan.py")


def _as_harness() -> bool:
    """Whether this process runs a harness script (not, say, pytest importing one)."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.abspath(sys.argv[0])
    return os.path.dirname(script) == here and os.path.basename(script) in HARNESSES


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Imports in the body are instrumented for coverage when atheris is active."""
    if atheris is not None and _as_harness() and "--random" not in sys.argv:
        with atheris.instrument_imports(include=["amigafuse"]):
            yield
    else:
        yield


def _random(one_input: OneInput, count: int, seed: int) -> int:
    from fuzz._common import BytesProvider

    rng = random.Random(seed)
    failures = 0
    started = time.monotonic()
    out_dir = os.environ.get("FUZZ_FINDINGS", "fuzz/findings")
    for i in range(count):
        data = rng.randbytes(rng.randint(8, 64))
        try:
            one_input(BytesProvider(data))
        except Exception:
            failures += 1
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"random-{seed}-{i}")
            with open(path, "wb") as f:
                f.write(data)
            print(f"finding saved to {path}:", file=sys.stderr)
            traceback.print_exc()
    took = time.monotonic() - started
    print(f"{count} random inputs in {took:.1f} s, {failures} findings", file=sys.stderr)
    return 1 if failures else 0


def main(one_input: OneInput) -> None:
    # The engines log what they tolerate (a damaged dircache...); thousands of inputs
    # a minute would drown the fuzzer's own output.
    logging.disable(logging.CRITICAL)
    argv = sys.argv
    if "--random" in argv:
        count = int(argv[argv.index("--random") + 1])
        seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 1
        sys.exit(_random(one_input, count, seed))
    if atheris is None:
        sys.exit("atheris is not installed: pip install -e '.[fuzz]', or use --random N")

    def test_one_input(data: bytes) -> None:
        one_input(atheris.FuzzedDataProvider(data))

    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
