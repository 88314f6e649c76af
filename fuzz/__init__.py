"""Fuzz harnesses for hostile images (see fuzz/README.md).  Not part of the package."""
