"""Foundations every layer may use: the error a user can fix, atomic file writes, output paths,
devices and seeds, peak memory, stop signals, and the help's rendering. They import nothing else of
the package."""
