"""The inode table: engine object ids <-> FUSE inode numbers (pure bookkeeping).

A mount serves one or more volumes ("slots").  Every object is named by the pair
``(slot, object_id)``; hard links share an object_id, so they share an inode.  The
synthetic top directory of a whole-disk mount is slot ``-1``, object 0.

Invariants:
* ``_by_key`` and ``_by_inode`` are inverse maps; inode numbers are never reused within
  one mount (a stale kernel reference to a forgotten inode then fails with ENOENT
  instead of reaching another object).
* An entry stays while the kernel holds a lookup count on it (``lookup_count > 0``) or
  it is pinned (volume roots and the top directory).
* ``parent`` records the directory an object was last seen in (for soft-link depth);
  it is a hint, right for directories, which have exactly one parent.
"""

from __future__ import annotations

from dataclasses import dataclass

ROOT_INODE = 1  # pyfuse3.ROOT_INODE (FUSE_ROOT_ID); kept here so this module stays pure

TOP_SLOT = -1


@dataclass
class InodeEntry:
    inode: int
    slot: int
    object_id: int
    lookup_count: int = 0
    pinned: bool = False
    parent: int | None = None  # inode of the directory it was last seen in


class InodeTable:
    """Assigns inode numbers; counts the kernel's references (lookup/forget)."""

    def __init__(self) -> None:
        self._by_inode: dict[int, InodeEntry] = {}
        self._by_key: dict[tuple[int, int], InodeEntry] = {}
        self._next_inode = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_inode)

    def pin_root(self, slot: int, object_id: int) -> int:
        """Make ``(slot, object_id)`` the mount's root directory (inode ROOT_INODE)."""
        if ROOT_INODE in self._by_inode:
            raise ValueError("the root inode is already assigned")
        entry = InodeEntry(ROOT_INODE, slot, object_id, pinned=True)
        self._by_inode[ROOT_INODE] = entry
        self._by_key[(slot, object_id)] = entry
        return ROOT_INODE

    def pin(self, slot: int, object_id: int, parent: int | None = None) -> int:
        """An inode that stays for the whole mount (a volume root under the top directory)."""
        entry = self._get_or_create(slot, object_id)
        entry.pinned = True
        if parent is not None:
            entry.parent = parent
        return entry.inode

    def _get_or_create(self, slot: int, object_id: int) -> InodeEntry:
        entry = self._by_key.get((slot, object_id))
        if entry is None:
            entry = InodeEntry(self._next_inode, slot, object_id)
            self._next_inode += 1
            self._by_inode[entry.inode] = entry
            self._by_key[(slot, object_id)] = entry
        return entry

    def peek(self, slot: int, object_id: int) -> int:
        """The inode for an object, creating the mapping without counting a reference."""
        return self._get_or_create(slot, object_id).inode

    def find(self, slot: int, object_id: int) -> int | None:
        entry = self._by_key.get((slot, object_id))
        return entry.inode if entry is not None else None

    def ref(self, slot: int, object_id: int, parent: int | None = None) -> int:
        """The inode for an object the kernel now references once more (lookup, create...)."""
        entry = self._get_or_create(slot, object_id)
        entry.lookup_count += 1
        if parent is not None:
            entry.parent = parent
        return entry.inode

    def resolve(self, inode: int) -> InodeEntry | None:
        return self._by_inode.get(inode)

    def forget(self, inode: int, count: int) -> None:
        """The kernel dropped ``count`` references; unpinned entries at zero go away."""
        entry = self._by_inode.get(inode)
        if entry is None:
            return
        entry.lookup_count = max(0, entry.lookup_count - count)
        if entry.lookup_count == 0 and not entry.pinned:
            del self._by_inode[inode]
            del self._by_key[(entry.slot, entry.object_id)]

    def depth(self, inode: int, root_inodes: set[int], limit: int = 4096) -> int | None:
        """Directories between the volume root and ``inode`` (0 for the root itself), or
        None if the chain of recorded parents does not reach a root within ``limit``."""
        steps = 0
        current: int | None = inode
        while current is not None and steps <= limit:
            if current in root_inodes:
                return steps
            entry = self._by_inode.get(current)
            if entry is None:
                return None
            current = entry.parent
            steps += 1
        return None
