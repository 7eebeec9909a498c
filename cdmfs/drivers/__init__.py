"""The emulated device drivers, in the manner of Linux's lib/test_hmm.c: a
device mirrors the address space it touches, faults pages in (migrating them
into its memory or reaching them where they lie), runs access ops with a cost
model, and goes out of service and back.  Clients of the memory manager.
"""
