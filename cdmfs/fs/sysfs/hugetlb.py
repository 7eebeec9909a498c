"""``nodeN/hugepages/hugepages-<size>kB/``: the per-node hstate attributes of
mm/hugetlb_sysfs.c (``per_node_hstate_attrs``, and the demote group of an
hstate that can demote), for x86_64's two huge page sizes.

The emulator has no hugetlb pool: no node ever holds a huge page, so every
count reads 0.  A write to ``nr_hugepages`` is taken as the kernel takes it
on a node where no huge page can be allocated: a well-formed count
(``kstrtoul``) succeeds and allocates nothing, and the file still reads 0 --
``set_max_huge_pages()`` stops at the first allocation that fails and
returns success, so a script checks the result by reading the file back, as
it must on Linux.  A malformed count is EINVAL (ERANGE past ULONG_MAX).
``demote`` finds nothing to demote and succeeds likewise; ``demote_size``
accepts only the one smaller size there is, 2 MiB.
"""
from __future__ import annotations

from ...lib.kstrtox import kstrtoul, memparse
from .. import formats
from ..tree import Attr, Dir, Tree

#: (size kB, the size it demotes to in kB or 0): the hstates of x86_64 with
#: gigantic pages, in the order the kernel registers them.
HSTATES = ((2048, 0), (1048576, 2048))


def nr_hugepages_store(text: str) -> None:
    """``nr_hugepages_store()``: parse as the kernel parses; the pool stays
    empty (no huge page can be allocated on an emulated node)."""
    kstrtoul(text, 10)


def demote_store(text: str) -> None:
    """``demote_store()``: no free huge page to demote, so it stops at once."""
    kstrtoul(text, 10)


def demote_size_store(size_kb: int, text: str) -> None:
    """``demote_size_store()``: the size must be an hstate's, at least the
    smallest huge page and smaller than this one's: on x86_64 only 2 MiB."""
    size = memparse(text)
    if not any(size == kb * 1024 and kb < size_kb for kb, _ in HSTATES):
        raise ValueError(f"no huge page size {size} smaller than {size_kb} kB")


def add_node_hstates(tree: Tree, node_dir: Dir) -> None:
    """``nodeN/hugepages/`` as hugetlb_register_node() makes it."""
    hp = tree.add(node_dir, "hugepages", Dir())
    for size_kb, demote_kb in HSTATES:
        d = tree.add(hp, f"hugepages-{size_kb}kB", Dir())
        tree.add(d, "nr_hugepages", Attr(lambda: formats.ulong(0), nr_hugepages_store))
        tree.add(d, "free_hugepages", Attr(lambda: formats.ulong(0)))
        tree.add(d, "surplus_hugepages", Attr(lambda: formats.ulong(0)))
        if demote_kb:
            tree.add(d, "demote_size", Attr(lambda kb=demote_kb: formats.hugepages_demote_size(kb),
                                            lambda text, kb=size_kb: demote_size_store(kb, text)))
            tree.add(d, "demote", Attr(None, demote_store))
