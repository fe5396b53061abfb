"""Kernel facilities for one service each: cgroups, network, rootfs, mounts and the launcher."""
