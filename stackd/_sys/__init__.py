"""Thin typed wrappers over the Linux system calls the launcher needs that Python's `os` lacks."""
