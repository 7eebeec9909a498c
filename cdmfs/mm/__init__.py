"""The emulated memory manager: nodes and pools (machine), regions and their
page tables (region), memory policies (mempolicy), migration (migrate_device:
migrate_vma and fault-back; migrate: pages that must leave their frames),
memory hotplug, memory failure and long-term pins (gup).  It knows nothing
of FUSE, files or text formats: it takes hooks and emits events (lib.events).
"""
