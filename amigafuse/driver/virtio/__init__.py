"""VirtIO: pure split ring (ring.py), PCI transports (transport.py), status/features
(device.py) and the virtio-scsi controller (scsi.py)."""
