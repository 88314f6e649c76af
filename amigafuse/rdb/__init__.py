"""Rigid Disk Block support: codecs (:mod:`.blocks`), the bounded scanner (:mod:`.scan`),
mounter rules and service (:mod:`.mounter`) and the disk writer (:mod:`.writer`).
See docs/rdb.md.  Never imports ``amigafuse.fs``."""
