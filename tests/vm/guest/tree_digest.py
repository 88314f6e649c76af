"""Run inside the test guest: a JSON digest of the tree under argv[1]:
``{relative path: [kind, size, md5-or-link-target]}``.  Names are shown as text:
UTF-8 when they decode as such, else Latin-1 (Linux affs hands out raw Latin-1 bytes)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys


def text(name: bytes) -> str:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return name.decode("latin-1")


def digest(root: bytes) -> dict[str, list[object]]:
    out: dict[str, list[object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = text(os.path.relpath(path, root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ["link", 0, text(os.readlink(path))]
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ["dir", 0, ""]
            else:
                with open(path, "rb") as f:
                    out[rel] = ["file", st.st_size, hashlib.md5(f.read()).hexdigest()]
    return out


if __name__ == "__main__":
    print(json.dumps(digest(os.fsencode(sys.argv[1])), sort_keys=True))
