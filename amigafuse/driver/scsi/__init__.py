"""SCSI on top of a ScsiTransport: CDBs and sense (pure), disks (BlockDevices)."""
