"""amigafuse: AmigaOS FFS and SFS partitions on Linux through a userspace VirtIO SCSI driver."""

__version__ = "0.1.0"
