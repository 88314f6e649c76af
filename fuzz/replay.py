"""Replay a corpus (or saved findings) through one harness without coverage guidance,
e.g. under coverage.py to see which engine lines the campaign reached:

    .venv/bin/python -m coverage run --include='amigafuse/*' fuzz/replay.py ffs_read fuzz/corpus/ffs
    .venv/bin/python -m coverage report

Needs atheris (its FuzzedDataProvider decodes the inputs as the campaign did).
Prints the number of inputs replayed and the findings (exceptions) among them.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import logging

    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    logging.disable(logging.CRITICAL)

    harness = importlib.import_module(f"fuzz.{sys.argv[1]}")
    files = [
        p
        for arg in sys.argv[2:]
        for p in (sorted(Path(arg).iterdir()) if Path(arg).is_dir() else [Path(arg)])
    ]
    findings = 0
    for path in files:
        try:
            harness.one_input(atheris.FuzzedDataProvider(path.read_bytes()))
        except Exception:
            findings += 1
            print(f"finding: {path}", file=sys.stderr)
            traceback.print_exc()
    print(f"{len(files)} inputs replayed, {findings} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
