"""The FUSE face: pyfuse3 operations (ops), the entries and inodes (tree),
the kernel's text formats (formats), the sys tree (sysfs/), the files of
regions/ and devices/, and the daemon that mounts and serves it all.
"""
