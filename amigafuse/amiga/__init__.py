"""Pure Amiga conventions shared by every layer: DosTypes, dates, geometry, checksums."""
