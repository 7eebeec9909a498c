"""cdmfs: coherent device memory and HMM, emulated in user space as a FUSE filesystem.

``import cdmfs`` gives the client (SPEC §8); the daemon lives in ``cdmfs.daemon``.
"""
from .client import Mount, Node, Region, mount, mounted, umount

__all__ = ["Mount", "Node", "Region", "mount", "mounted", "umount"]
