"""cdmfs: coherent device memory and HMM, emulated in user space as a FUSE filesystem.

``import cdmfs`` gives the client (SPEC §8); the daemon lives in ``cdmfs.daemon``.
"""
from .client import BusyMountWarning, Device, Mount, Node, Region, mount, mounted, transact, umount

__all__ = ["BusyMountWarning", "Device", "Mount", "Node", "Region", "mount", "mounted", "transact", "umount"]
