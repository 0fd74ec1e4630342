"""Moved to `tfbackend.units` (rules word their messages with it too). Kept for old imports."""

from tfbackend.units import GIB, MIB, gib, size  # noqa: F401
