/*
 * cdmcore — the native core of cdmfs.
 *
 * Holds what the kernel keeps in struct page and in page tables, without any
 * Python object per page:
 *
 *  - pools: the physical memory of one emulated NUMA node or one device's
 *    private memory.  Frames live in a sparse anonymous mapping (MAP_NORESERVE),
 *    so a pool costs host memory only for frames that hold data.  Allocation is
 *    O(1): a bump pointer over frames never used, then a stack of freed frames.
 *  - regions: one uint64_t page-table entry per page of a region's data file
 *    (PFN, pool and flags, in the spirit of hmm_pfn / MIGRATE_PFN_*).
 *  - gather/scatter between a page range and a FUSE request buffer, allocating
 *    absent pages by an allocation plan (first touch), one call per request.
 *  - the steps of a migration (collect, lock, alloc, copy, finalize), batched.
 *  - the raw FUSE_NOTIFY_INVAL_INODE write (page-granular invalidation).
 *
 * Every entry point that reads or changes shared state (pools, frames and
 * their bytes, page tables) runs under the machine's mutex, and so does every
 * write of a frame's bytes, migration copies included; no state is kept per
 * thread.  Any thread may call any entry point (cffi releases the GIL around
 * every call); calls serialise on the mutex.  The number of pools is read
 * under it too (a lookup by PFN, a pool index passed in), since another
 * thread may be adding one.  What the caller reaches through the structs
 * directly (the bytes at cdm_pfn_addr(), struct fields) is outside the lock:
 * for tests that look inside; cdmfs reads pools and regions through the
 * snapshot accessors (cdm_pool_snapshot, cdm_region_snapshot).
 *
 * Ranges: callers pass [first, first + n) of pages (of bytes, of PFNs) from
 * user-controlled offsets, so no entry point takes the sum before knowing it
 * does not wrap around 2^64 (a page past 2^64 must never alias page 0).  A
 * range that runs past the end, or past 2^64, is cut at the end by the walks
 * and the frame census, refused by the calls that must do all of it (rw,
 * populate, pin, device op: see each), and its missing pages are skipped by
 * the migration steps (collect: -EINVAL, lock and finalize: -ENOENT).
 *
 * The code is cut as the kernel's mm tree: page_alloc.c (pools, frames),
 * pagetable.c (page tables, gather/scatter, walks, introspection), migrate.c,
 * device.c (device ops, CRC-32), hotplug.c (memory blocks), memory_failure.c
 * (retire, poison), gup.c (long-term pins), fuse.c and router.c (the
 * request router between /dev/fuse and pyfuse3); internal.h is what they
 * share.  This header is the only public one: cffi's cdef is made from it.
 */
#ifndef CDMCORE_H
#define CDMCORE_H

#include <stdint.h>
#include <pthread.h>

#define CDM_PAGE_SHIFT 12
#define CDM_PAGE_SIZE 4096
#define CDM_MAX_POOLS 64
/* Policies Python numbers for the core's first-touch lookups (mempolicy.c). */
#define CDM_MAX_POLICIES 256

/* Page-table entry layout: global PFN, the pool it belongs to, flags. */
#define CDM_PTE_PFN_MASK 0xffffffffffULL      /* bits 0-39 */
#define CDM_PTE_POOL_SHIFT 40                 /* bits 40-47 */
#define CDM_PTE_POOL_MASK 0xff0000000000ULL
#define CDM_PTE_PRESENT (1ULL << 63)   /* backed by a frame */
#define CDM_PTE_CPU (1ULL << 62)       /* believed to be in the host page cache */
#define CDM_PTE_LOCKED (1ULL << 61)    /* being copied by a migration: access waits */
#define CDM_PTE_PINNED (1ULL << 60)    /* long-term pin: never migrates */
#define CDM_PTE_POISONED (1ULL << 59)  /* its frame was poisoned: data lost */
#define CDM_PTE_DIRTY (1ULL << 58)     /* has been written since allocation */
#define CDM_PTE_PRIVATE (1ULL << 57)   /* frame is device-private memory */
#define CDM_PTE_MIGRATING (1ULL << 56) /* collected; CPU copies being invalidated */
#define CDM_PTE_NUMA (1ULL << 55)      /* NUMA hinting (change_prot_numa): the CPU's copy was
                                        * unmapped to sample accesses; the next CPU fault
                                        * is a hinting fault, Python's (numa_balancing.c) */
#define CDM_PTE_DUPLICATED (1ULL << 54) /* a device holds a read-only duplicate
                                         * (read_mostly): a WRITE must collapse
                                         * it first, cdm_region_serve leaves
                                         * such a WRITE to Python */
/* bit 48 is the core's own (PTE_NEW in internal.h: allocated by the call under
 * way, never left in an entry when a call returns); bits 49-54 are free for
 * later users (device mirror, access hints). */

/* Pool flags */
#define CDM_POOL_PRIVATE 1             /* device-private: the CPU cannot map it */
#define CDM_POOL_ISOLATED 2            /* no allocation at all (device going offline) */

/* Per-block flags (struct cdm_pool.bflags) */
#define CDM_BLOCK_ISOLATED 1           /* no allocation from it (offlining, offline, absent) */

/* Per-frame flags (struct cdm_pool.fflags) */
#define CDM_FRAME_RETIRED 1            /* soft- or hard-offlined: never reused */
#define CDM_FRAME_POISONED 2
#define CDM_FRAME_USED 4               /* handed out: holds a page, or a migration's copy */
#define CDM_FRAME_STALE 8              /* free but not dropped: holds old bytes */

/* Freed frames that stay resident per pool, for reuse without a host page
 * fault (device memory is always backed); beyond it they go back to the host. */
#define CDM_RESIDENT_FREE_PAGES 16384

/* Event counters kept per pool, shown in numastat/vmstat.  The NUMA ones
 * (numa_hit .. other_node) are counted as zone_statistics() counts them, for
 * every page allocated on a node: a first touch, and a migration's target
 * (cdm_migrate_alloc, cdm_migrate_alloc_plan).  Device-private pools are not
 * nodes: no NUMA event is ever counted on one. */
enum cdm_counter {
    CDM_NUMA_HIT,
    CDM_NUMA_MISS,
    CDM_NUMA_FOREIGN,
    CDM_INTERLEAVE_HIT,
    CDM_LOCAL_NODE,
    CDM_OTHER_NODE,
    CDM_PGFAULT,
    CDM_PGALLOC,
    CDM_PGFREE,
    CDM_PGMIGRATE_SUCCESS,
    CDM_PGMIGRATE_FAIL,
    CDM_NR_COUNTERS
};

struct cdm_pool {
    uint8_t *base;          /* frame 0 of this pool */
    uint64_t base_pfn;      /* global PFN of frame 0 */
    uint64_t npages;
    uint64_t next_fresh;    /* frames at or above it were never allocated */
    uint64_t *free_stack;   /* frame indices freed and reusable */
    uint64_t nfree_stack, free_cap;
    uint64_t nresident;     /* the top entries of free_stack that may be STALE */
    uint64_t nr_used;       /* frames holding a region page */
    uint64_t nr_retired;    /* frames taken out of use (poison, soft offline) */
    uint64_t nr_mapped;     /* used frames believed CPU-mapped */
    uint64_t nr_dirty;      /* used frames whose page was written */
    uint64_t nr_pinned;     /* used frames of pinned pages */
    uint64_t nr_held;       /* used frames no page owns (rmap 0): handed out by
                             * cdm_pool_alloc, or a migration's targets between
                             * cdm_migrate_alloc and finalize/abort */
    uint64_t fail_alloc;    /* fault injection: fail this many allocations */
    uint64_t *rmap;         /* per frame: owner ((region id + 1) << 40 | page), 0 free */
    uint8_t *fflags;        /* per frame: CDM_FRAME_* */
    uint64_t counters[CDM_NR_COUNTERS];
    int flags;
    /* Memory blocks (sys/devices/system/memory), see cdm_pool_set_blocks(). */
    uint64_t block_pages;   /* frames per block; 0: the pool is not cut into blocks */
    uint64_t nblocks;
    uint8_t *bflags;        /* per block: CDM_BLOCK_* */
};

struct cdm_policies;
struct cdm_region_policies;
struct cdm_faultback_log;
struct cdm_trace_ring;

struct cdm_machine {
    pthread_mutex_t lock;
    int npools;
    struct cdm_pool pools[CDM_MAX_POOLS];
    /* Frames [drop_start, drop_start + drop_len) of pool drop_pool are free
     * and still to be given back to the host (MADV_DONTNEED): gathered under
     * lock, always issued before lock is released (drop_len is 0 whenever
     * lock is free). */
    int drop_pool;
    uint64_t drop_start, drop_len;
    /* The pool of the node whose CPU runs migrations (numa_node_id() of the
     * task that migrates): the local node of their target pages in the NUMA
     * counters; -1 (the default) for none.  See cdm_machine_set_cpu_pool(). */
    int cpu_pool;
    struct cdm_policies *policies;  /* plans and CPU nodes for first touch in C */
    struct cdm_faultback_log *faultbacks;   /* fault-backs served in C, for Python */
    uint32_t trace_mask;    /* 1 << CDM_TRACE_*: what serve records (cdm_machine_trace) */
    struct cdm_trace_ring *trace;
};

/*
 * A region's page table is reserved for a whole file (up to 2^34 entries for
 * 64 TiB) and mostly never written.  Walks over a range find the entries that
 * hold something through a populated index, so that they cost time and host
 * memory in proportion to the pages present, not to the range: a bit per
 * chunk of CDM_CHUNK_PAGES entries (one 4 KiB page of pte), set whenever an
 * entry of the chunk becomes non-zero, and a summary bit per 64-bit word of
 * that bitmap, set when the word is not zero.  A set chunk bit may be stale
 * (the chunk has become all zero; walks clear it when they find so), a clear
 * one never hides a non-zero entry.  Entries at or beyond npages are zero.
 * Code outside the core that writes pte[] directly may change only entries
 * that are already non-zero: the index would not know of any other.
 */
#define CDM_CHUNK_PAGES 512

/* The most pages a region may have: the reverse map keeps a frame's page
 * index in 40 bits (see struct cdm_pool.rmap). */
#define CDM_REGION_MAX_PAGES (1ULL << 40)

struct cdm_region {
    uint64_t *pte;          /* sparse mapping of cap entries */
    uint64_t size;          /* bytes of the file: past them the last page reads zero */
    uint64_t npages;        /* pages of the file (size rounded up) */
    uint64_t cap;           /* entries reserved in pte */
    uint32_t id;
    uint64_t resident[CDM_MAX_POOLS]; /* pages per pool */
    uint64_t nr_pinned;
    uint64_t nr_poisoned;
    uint64_t *chunks;       /* sparse: a bit per CDM_CHUNK_PAGES entries, set if any may be non-zero */
    uint64_t *summary;      /* sparse: a bit per word of chunks, set if the word is not zero */
    uint64_t served_reads;  /* READs served by cdm_region_serve (the router, in C) */
    uint64_t served_writes; /* WRITEs served by cdm_region_serve */
    struct cdm_region_policies *policies;   /* policy ranges (cdm_region_set_policies) */
    uint64_t nr_duplicated; /* present pages marked CDM_PTE_DUPLICATED */
};

/*
 * Where a page goes on first touch, decided by the memory policy in Python
 * and applied here page by page.  The intended pool of page index i is
 * table[i % ntable] (one entry for most policies; the interleave set, each
 * node repeated by its weight, for (weighted) interleave).  fallback is
 * CDM_MAX_POOLS rows of CDM_MAX_POOLS pool indices: row p lists the pools to
 * try, in order, when p is intended; -1 ends a row.
 */
struct cdm_plan {
    int32_t local;          /* pool of the faulting CPU's node: local/other */
    int32_t interleave;     /* count interleave_hit when the intended pool is used */
    uint32_t ntable;
    const int32_t *table;
    const int32_t *fallback;
    /* preferred_many tries its nodemask first and then the whole machine from
     * the local node: a page outside first_pools (a bit per pool; 0: none of
     * this) is charged against spill, the local pool, as zone_statistics()
     * charges the second attempt's preferred zone. */
    uint64_t first_pools;
    int32_t spill;
};

/* What a gather/scatter did, or where it stopped. */
struct cdm_rw_result {
    uint64_t allocated;     /* pages allocated by this call (first touch) */
    uint64_t page;          /* with an error: the page that caused it */
};

/* Status of one page in a migration (negative: skipped, with -errno). */
#define CDM_MIG_MOVE 0          /* collected: will move */
#define CDM_MIG_ALLOC 1         /* never touched: allocated on the target */
#define CDM_MIG_THERE 2         /* already on the target */
#define CDM_MIG_DONE 3          /* finalize: moved */

/*
 * Snapshots: what a pool or a region counts, copied under the mutex in one
 * call, so that the numbers of one file agree with each other and a sysfs
 * read (meminfo, vmstat, numastat of a node; a region's stat) costs one call
 * whatever it shows.
 */
struct cdm_pool_stats {
    uint64_t base_pfn;      /* geometry, as added */
    uint64_t npages;
    uint64_t nr_free;       /* npages - nr_used - nr_retired (cdm_pool_free_pages) */
    uint64_t nr_used, nr_retired, nr_mapped, nr_dirty, nr_pinned, nr_held;
    uint64_t counters[CDM_NR_COUNTERS];
    int flags;              /* CDM_POOL_* */
};

struct cdm_region_stats {
    uint64_t size;          /* bytes */
    uint64_t npages;
    uint64_t nr_pinned, nr_poisoned;
    uint64_t resident[CDM_MAX_POOLS];   /* pages per pool */
    uint64_t served_reads, served_writes;   /* by cdm_region_serve (see there) */
    uint64_t nr_duplicated;                 /* pages some device holds a read duplicate of */
};

struct cdm_machine *cdm_machine_new(void);
void cdm_machine_free(struct cdm_machine *m);
/* Sets m->cpu_pool: a migration's target pages count as local_node on that
 * pool's node and other_node elsewhere (-1: no pool is local). */
void cdm_machine_set_cpu_pool(struct cdm_machine *m, int pool);

/* Adds a pool of npages frames starting at base_pfn; returns its index or
 * -errno: -EINVAL unless base_pfn + npages <= CDM_PTE_PFN_MASK (the PFN field
 * of an entry) and the pool overlaps no other. */
int cdm_pool_add(struct cdm_machine *m, uint64_t base_pfn, uint64_t npages, int flags);
uint64_t cdm_pool_free_pages(struct cdm_machine *m, int pool);
/* A pool's snapshot into out: 0, or -EINVAL (no such pool, out untouched). */
int cdm_pool_snapshot(struct cdm_machine *m, int pool, struct cdm_pool_stats *out);
/* Fault injection: the next n allocations from the pool fail (a device's
 * inject fail_alloc N); under the lock, as every change of a pool. */
void cdm_pool_fail_alloc(struct cdm_machine *m, int pool, uint64_t n);
/* Allocates n frames of a pool (PFNs into out); all or none.  Returns 0,
 * -ENOMEM, or -EINVAL if there is no such pool.  A pool index passed to any
 * entry point is checked under the mutex: an unknown one is -EINVAL where
 * the call returns an error, else it changes nothing (free pages: 0). */
int cdm_pool_alloc(struct cdm_machine *m, int pool, uint64_t n, uint64_t *out);
/* Frees frames given by global PFN; frames outside every pool or not in use
 * are ignored. */
void cdm_pool_free(struct cdm_machine *m, const uint64_t *pfns, uint64_t n);
/* Where a global PFN lives: its pool, or -1. */
int cdm_pfn_pool(struct cdm_machine *m, uint64_t pfn);
/* The frame's bytes (for tests and the device model).  Accesses through the
 * pointer are not under the mutex: the caller must know that no other thread
 * frees or reuses the frame meanwhile. */
uint8_t *cdm_pfn_addr(struct cdm_machine *m, uint64_t pfn);
/* Owner of a frame: region id and page, 0 if it holds a page, -ENOENT if it
 * holds none (free, or held without owner: see nr_held), -EINVAL outside
 * every pool. */
int cdm_pfn_owner(struct cdm_machine *m, uint64_t pfn, uint32_t *region, uint64_t *page);

struct cdm_region *cdm_region_new(struct cdm_machine *m, uint32_t id);
/*
 * Sets the region's size in bytes (truncate(2)): npages becomes size rounded
 * up to pages; shrinking frees the pages beyond, the last first (the free
 * stack then hands their frames out in address order).  In the same hold of
 * the mutex, the bytes of the page the end cuts in two that lie past the end
 * (shrinking) or past the old end (growing) are zeroed, so that the file
 * reads zero there whatever was written past its end (a device kernel runs
 * on whole pages).  A page in device-private memory is zeroed there, the
 * frame being the device's memory: it reads zero when it comes back.  A
 * poisoned page stays poisoned (it has no frame), an absent page or a
 * migration's placeholder is zero already.  Returns 0, or changing nothing:
 *   -EINVAL  more than CDM_REGION_MAX_PAGES pages
 *   -ENOMEM  the host refused the larger page table
 *   -EAGAIN  the page to zero is locked by a migration, whose copy of it may
 *            be taken already: wait for the migration, then retry (truncate
 *            waits on the folio lock a migration holds likewise)
 */
int cdm_region_truncate(struct cdm_machine *m, struct cdm_region *r, uint64_t size);
/* cdm_region_truncate() to npages whole pages. */
int cdm_region_resize(struct cdm_machine *m, struct cdm_region *r, uint64_t npages);
/* A region's snapshot into out. */
void cdm_region_snapshot(struct cdm_machine *m, struct cdm_region *r, struct cdm_region_stats *out);
/* Frees every page and the region itself. */
void cdm_region_free(struct cdm_machine *m, struct cdm_region *r);
/* Copies n entries of the page table from first (a consistent snapshot). */
void cdm_region_ptes(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                     uint64_t n, uint64_t *out);

/*
 * Gather (write == 0: a CPU fault or read()) or scatter (write == 1: write-back
 * or write()) bytes [off, off + len) of a region to/from buf, allocating the
 * absent pages by plan first.  Pages touched are marked CPU-mapped when
 * mark_cpu is set.  Returns 0, or without changing anything:
 *   -EINVAL  the bytes run past the end of the region (or past 2^64)
 *   -ENOSPC  a page could not be allocated (res->page)
 *   -EIO     a page is poisoned (res->page)
 *   -EAGAIN  a page is locked by a migration (res->page): wait, then retry
 *   -EREMOTE a page is in device-private memory (res->page): migrate it back first
 */
int cdm_region_rw(struct cdm_machine *m, struct cdm_region *r, uint64_t off, uint64_t len,
                  uint8_t *buf, int write, int mark_cpu, const struct cdm_plan *plan,
                  struct cdm_rw_result *res);

/*
 * The fast path of a FUSE READ (write == 0) or WRITE (write == 1) of a
 * region's data, for the router's thread (issue 13, step 2): serves
 * [off, off + len) only when nothing but placement and the copy is needed,
 * as cdm_region_rw would serve it -- no page poisoned, locked by a migration
 * or in device-private memory; a READ from below the end (cut at the end, as
 * Region.fault cuts it: the bytes served are returned), a WRITE wholly
 * inside the file (one past the end grows it: Python's).  Absent pages are
 * a first touch: placed by the plan Python published for the policy of
 * their range (cdm_region_set_policies, cdm_machine_set_plan) and the
 * faulting CPU's pool local (-1: not known yet -- then -ENXIO, changing
 * nothing: the caller finds it with cdm_machine_local_pool() and calls
 * again).  Under the mutex: allocates, copies, marks the pages CPU-mapped (a
 * WRITE not of a page being migrated, as cdm_region_rw), dirty (WRITE),
 * counts one pgfault per READ on its first page's pool, the NUMA events of
 * the pages placed, and served_reads or served_writes of the region (what
 * Python counts as cpu_faults and writebacks).  Returns the bytes copied,
 * -ENXIO (above), or -EAGAIN changing nothing: Python serves the request
 * (a page it must handle -- a READ of a page marked CDM_PTE_NUMA is a NUMA
 * hinting fault --, no published plan, the range split between
 * policies, no memory left, the fault-back log full).
 */
int64_t cdm_region_serve(struct cdm_machine *m, struct cdm_region *r, uint64_t off, uint64_t len,
                         uint8_t *buf, int write, int32_t local, uint32_t pid);

/*
 * The trace ring (trace.c): what cdm_region_serve served, for the trace
 * stream, while cdm_machine_trace() asks for its kinds (a mask of 1 << kind;
 * 0 stops recording).  A READ is recorded as the fault it was: a first touch
 * (it placed a page), a fault-back (it brought a device's private page back),
 * or a fault of pages already present; a WRITE as a write-back.  pool: where
 * page first lives after it.  The ring holds CDM_TRACE_RING records; when
 * full, records are dropped and counted, and the take that empties the ring
 * reports them in *lost.  Returns the records copied to out, oldest first.
 */
#define CDM_TRACE_RING 8192
enum {
    CDM_TRACE_FIRST_TOUCH,
    CDM_TRACE_FAULT,
    CDM_TRACE_FAULT_BACK,
    CDM_TRACE_WRITEBACK,
};
struct cdm_trace_rec {
    uint64_t ts_ns;         /* CLOCK_MONOTONIC */
    uint32_t kind;
    uint32_t region;
    uint32_t pid;
    int32_t pool;
    uint64_t first, n;
};
int cdm_machine_trace(struct cdm_machine *m, uint32_t mask);
uint64_t cdm_machine_take_trace(struct cdm_machine *m, struct cdm_trace_rec *out, uint64_t max,
                                uint64_t *lost);

/*
 * A fault-back cdm_region_serve did (the router's migrate_to_ram): pages of
 * [first, first + n) of region (its id) that left device memory pool for
 * system RAM.  The core keeps them in a log of CDM_FAULTBACK_LOG entries
 * (serve leaves a request to Python rather than fill it) until Python takes
 * them, oldest first, to do what only it knows: drop the devices' mirrored
 * entries of the range and count the move in the device's statistics and
 * the region's.  Returns how many were copied to out (at most max).
 */
#define CDM_FAULTBACK_LOG 1024
struct cdm_faultback {
    uint32_t region;
    int32_t pool;
    uint64_t first, n;
    uint64_t moved;
    int32_t to;             /* the pool the first page moved to */
};
uint64_t cdm_machine_take_faultbacks(struct cdm_machine *m, struct cdm_faultback *out,
                                     uint64_t max);

/*
 * First touch in C (mempolicy.c).  Python decides every placement; the core
 * keeps copies of its decisions for the router's first touches:
 *
 * set_plan       — the plan of policy (a number Python gives, below
 *                  CDM_MAX_POLICIES) for a CPU on pool plan->local; copied
 *                  (table, fallback).  0, -EINVAL (a pool the machine lacks).
 * clear_plans    — forgets every plan (the placement changed: a node's
 *                  state, isolation or weight).
 * set_cpu_nodes  — the pool of each CPU's node (cpu_pool[cpu], ncpus of
 *                  them) and of a CPU outside them (default_pool).
 * local_pool     — the pool of the CPU pid last ran on (from /proc/PID/stat
 *                  unless every CPU is on one node), default_pool if unknown;
 *                  -1 before set_cpu_nodes.
 * region_set_policies — the policy numbers placing r: n ranges [start[k],
 *                  end[k]) of pages (sorted, disjoint) with id[k], the rest
 *                  default_id; -1 for a policy without a number (its first
 *                  touches stay Python's).  Replaces the previous ranges; on
 *                  failure (-ENOMEM, -EINVAL: ranges not sorted and
 *                  disjoint) leaves none, so Python places every first touch
 *                  of r.
 */
int cdm_machine_set_plan(struct cdm_machine *m, int32_t policy, const struct cdm_plan *plan);
void cdm_machine_clear_plans(struct cdm_machine *m);
int cdm_machine_set_cpu_nodes(struct cdm_machine *m, int32_t default_pool, uint32_t ncpus,
                              const int32_t *cpu_pool);
int32_t cdm_machine_local_pool(struct cdm_machine *m, int32_t pid);
int cdm_region_set_policies(struct cdm_machine *m, struct cdm_region *r, int32_t default_id,
                            uint64_t n, const uint64_t *start, const uint64_t *end,
                            const int32_t *id);

/* Allocates the absent pages of [first, first + n) by plan without copying or
 * marking them CPU-mapped (a device's first touch).  0, or -ENOSPC (nothing
 * allocated, res->page), -EAGAIN for a page a migration holds, -EINVAL if
 * the range runs past the end (res->page: the first page missing). */
int cdm_region_populate(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                        uint64_t n, const struct cdm_plan *plan, struct cdm_rw_result *res);

/* How many pages of [first, first + n) have flag set in their entry. */
uint64_t cdm_region_count(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                          uint64_t n, uint64_t flag);

/* The first page i of [first, min(end, npages)) whose entry is not zero (any
 * flag: present, poisoned, a migration's placeholder), or end if there is none.
 * Costs the chunks populated in the range, not its size. */
uint64_t cdm_region_next_present(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                 uint64_t end);

/* The first page i of [first, min(end, npages)) whose entry is zero (never
 * touched, or freed), or min(end, npages) if there is none.  Costs the
 * chunks populated from first on up to the answer (lseek SEEK_HOLE). */
uint64_t cdm_region_next_absent(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                uint64_t end);

/*
 * Punches bytes [off, off + len) (clipped to the size) out of a region, as
 * fallocate(FALLOC_FL_PUNCH_HOLE) on tmpfs: the whole pages inside are freed
 * (entries zeroed: they read zero and are holes to SEEK_HOLE again), the
 * partial pages at the edges are zeroed where they have a frame (CPU or
 * device-private memory, as truncation zeroes the page its end cuts), the
 * file's last page counting as whole past the end.  As truncation does,
 * pinned pages are freed with the rest (nr_pinned drops) and a poisoned page
 * forgets its poison; a poisoned edge page stays poisoned.  One hold of the
 * mutex.  The caller invalidates the CPU's copies and the devices' mirrors
 * first.  0, or -EAGAIN changing nothing if a page of the range is locked or
 * collected by a migration: wait for it, then retry.
 */
int cdm_region_punch(struct cdm_machine *m, struct cdm_region *r, uint64_t off, uint64_t len);

/* Runs of consecutive pages of [first, first + n) whose entry has any bit of
 * flag set: run_first, run_len, at most max runs.  *next gets the page to go
 * on from: the start of the first run that found no room, else first + n
 * clipped to npages (done).  Returns the runs written. */
uint64_t cdm_region_flag_runs(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                              uint64_t n, uint64_t flag, uint64_t *run_first, uint64_t *run_len,
                              uint64_t max, uint64_t *next);

/* Sets mirror[i] = value for the pages i of [first, first + n) whose frame is
 * in pool (a device mapping what now lives in its memory).  Returns how many. */
uint64_t cdm_region_mirror_pool(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                uint64_t n, int pool, uint8_t *mirror, uint8_t value);

/* Clears the CPU-mapped belief of n pages from first (after an invalidation). */
void cdm_region_uncache(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n);

/*
 * NUMA hinting (numa_balancing.c; kernel/sched/fair.c task_numa_work and
 * mm/mprotect.c change_prot_numa):
 *
 * numa_mark — sets CDM_PTE_NUMA on the pages of [first, first + n) the CPU
 *            is believed to map (CDM_PTE_CPU) that sit in a pool whose bit
 *            is set in pools and may move (not pinned, poisoned, locked,
 *            collected or device-private), at most max of them; pages
 *            already marked are left as they are and not counted.  *next
 *            gets the page to go on from (after the last one marked when max
 *            was reached, else the end of the range, clipped to npages).
 *            Costs the pages present.  Returns the pages marked (the
 *            kernel's numa_pte_updates).  The caller then invalidates the
 *            CPU's copies of the marked pages: the next CPU access of one is
 *            a FUSE READ, which cdm_region_serve leaves to Python (-EAGAIN),
 *            the hinting fault.
 * numa_take — for the hinting fault: copies the n entries from first to out
 *            (as they were) and clears CDM_PTE_NUMA in them, under one hold
 *            of the mutex, so that each hinting fault is taken once.  Returns
 *            how many had it.
 */
uint64_t cdm_region_numa_mark(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                              uint64_t n, uint64_t pools, uint64_t max, uint64_t *next);
uint64_t cdm_region_numa_take(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                              uint64_t n, uint64_t *out);

/*
 * Migration, in the steps of migrate_vma (mm/migrate_device.c):
 *
 * collect  — for each page of [first, first + n): a page that can move to pool
 *            target is marked MIGRATING and its old entry saved in src[i]
 *            (status CDM_MIG_MOVE; its CPU belief is cleared, the caller
 *            invalidates the CPU copies of pages whose src had CDM_PTE_CPU);
 *            an untouched page gets CDM_MIG_ALLOC with CDM_COLLECT_ALLOC_ABSENT
 *            in flags, else -ENOENT;
 *            others: CDM_MIG_THERE, -EBUSY (pinned, locked), -EIO (poisoned).
 *            from_pools, when not 0, limits the pages that move to those in
 *            pools whose bit is set (a CPU fault-back moves only private pages);
 *            the others are CDM_MIG_THERE.
 * lock     — after the invalidation: pages the CPU touched again meanwhile are
 *            skipped (-EBUSY); the others become LOCKED (accesses wait).
 * alloc    — target frames for every CDM_MIG_MOVE/ALLOC page into dst[i];
 *            a page that gets none is skipped with -ENOMEM (-EINVAL: no
 *            pool target).
 * copy     — src -> dst for every moving page, under the mutex (other calls
 *            wait for the batch; the GIL is released meanwhile).  A dst that
 *            is not a frame the migration holds (handed out, no owner) or a
 *            src that names no frame is not copied: finalize fails its page.
 * finalize — moving pages take their new entry, sources are freed, every
 *            page is unlocked; status becomes CDM_MIG_DONE.  Every dst is
 *            checked first: it must be a frame of pool target (any pool
 *            when target is -1: cdm_migrate_alloc_plan's) that the
 *            migration holds (handed out by an alloc step, owned by no
 *            page).  Otherwise (outside every pool or target, free, a page's,
 *            the same frame as a later page's dst) the page stays where it
 *            is, unlocked, with -EINVAL; a held frame of another pool goes
 *            back to its pool, any other is left alone.  Returns pages moved.
 *            abort frees only held frames likewise.
 */
#define CDM_COLLECT_ALLOC_ABSENT 1  /* untouched pages are allocated on the target */
#define CDM_COLLECT_TAKEOVER 2      /* take pages another migration collected but has not
                                     * locked (a CPU fault-back must not wait for a migration
                                     * whose invalidation waits for the faulting READ) */
int64_t cdm_migrate_collect(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                            uint64_t n, int target, int flags, uint64_t from_pools,
                            uint64_t *src, int32_t *status);
int64_t cdm_migrate_lock(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                         uint64_t n, int32_t *status);
/* lock, also skipping (-ENOENT) a page whose frame is no longer src[k]'s. */
int64_t cdm_migrate_lock_src(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                             uint64_t n, const uint64_t *src, int32_t *status);
/* Each target page on a node counts as alloc_migration_target() counts it
 * (__GFP_THISNODE on the target): numa_hit on the target, local_node if the
 * target is m->cpu_pool, else other_node. */
int64_t cdm_migrate_alloc(struct cdm_machine *m, int target, uint64_t n,
                          int32_t *status, uint64_t *dst);
/* alloc by a policy's plan instead of one pool: page first + k gets a frame
 * as its first touch would (its interleave slot, then that slot's fallback),
 * as migrate_to_ram() allocates by the vma's policy, page by page; the NUMA
 * events are a first touch's (hit/miss/foreign against the page's intended
 * pool, interleave_hit, local/other against plan->local). */
int64_t cdm_migrate_alloc_plan(struct cdm_machine *m, uint64_t first, uint64_t n,
                               const struct cdm_plan *plan, int32_t *status, uint64_t *dst);
void cdm_migrate_copy(struct cdm_machine *m, uint64_t n, const int32_t *status,
                      const uint64_t *src, const uint64_t *dst);
int64_t cdm_migrate_finalize(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                             uint64_t n, int target, const uint64_t *dst, int32_t *status);

/* Undoes a migration between collect and finalize (an error, a cancellation):
 * collected pages are unlocked where they are, target frames in dst (may be
 * NULL) are freed, their status becomes -EINTR. */
void cdm_migrate_abort(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                       uint64_t n, const uint64_t *dst, int32_t *status);
/* The pages a migration skipped: their indices (from 0) and -errno.  Returns how many. */
uint64_t cdm_migrate_holes(const int32_t *status, uint64_t n, uint64_t *idx, int32_t *err);
/* The same as runs of consecutive skipped pages with the same -errno: first and
 * last index (from 0, inclusive) into run_first/run_last, the -errno into err
 * (room for as many runs as skipped pages).  Returns how many runs. */
uint64_t cdm_migrate_hole_runs(const int32_t *status, uint64_t n, uint64_t *run_first,
                               uint64_t *run_last, int32_t *err);
/* Runs of collected pages (status MOVE/ALLOC) that had flag in their saved
 * entry: offsets into start[], lengths into len[] (room for n/2 + 1 runs).
 * Returns how many runs. */
uint64_t cdm_migrate_runs(const uint64_t *src, const int32_t *status, uint64_t n, uint64_t flag,
                          uint64_t *start, uint64_t *len);
/* How many collected pages (status MOVE/ALLOC) had flag in their saved entry. */
uint64_t cdm_migrate_count(const uint64_t *src, const int32_t *status, uint64_t n, uint64_t flag);
/* Where the pages a finished batch moved (status CDM_MIG_DONE) came from
 * (the pools of their src entries; none for a page allocated on the target)
 * and went to (the pools of their dst frames): a bit per pool each.
 * Returns the batch's holes: the pages it skipped. */
uint64_t cdm_migrate_places(struct cdm_machine *m, const uint64_t *src, const uint64_t *dst,
                            const int32_t *status, uint64_t n, uint64_t *from, uint64_t *to);

/*
 * Device access to pages [first, first + n) of a region, on the frames where
 * the pages are: a device's compute kernel.  Every page must be present and
 * reachable by the device: returns, changing nothing,
 *   -ENOENT  a page is not present (res->page)
 *   -EIO     a page is poisoned
 *   -EAGAIN  a page is locked by a migration: wait, then retry
 *   -EREMOTE a page is in another device's private memory
 *   -EINVAL  first + n wraps around 2^64 (pages past the end: -EIO)
 * Bytes on pools in own_pools (a bit per pool) count as local, others remote.
 * res->crc is the CRC-32 to continue from (0 to start): a long read can be cut
 * into calls, each given the crc the last one returned; every other field is
 * cleared on entry.
 */
#define CDM_OP_READ 0      /* reads, CRC-32 (zlib's) of the bytes so far in res->crc */
#define CDM_OP_WRITE 1     /* fills with the byte arg */
#define CDM_OP_ADD 2       /* adds arg to every little-endian 64-bit word */
#define CDM_OP_TOUCH 3     /* reads, no checksum */
#define CDM_OP_COPYOUT 4   /* copies the pages' bytes to the host buffer at arg
                              * (n pages long): a device's DMA out of them */
#define CDM_OP_COPYIN 5    /* copies n pages of bytes from the host buffer at arg
                              * into the pages: a device's DMA into them */

struct cdm_op_result {
    uint64_t page;          /* with an error: the page */
    uint32_t crc;
    uint64_t local_bytes, remote_bytes;
    uint64_t cpu_pages;     /* pages believed CPU-mapped when the op ran */
};

int cdm_device_op(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                  int op, uint64_t arg, uint64_t own_pools, uint64_t private_ok,
                  struct cdm_op_result *res);
/* zlib-compatible CRC-32 of len bytes, continuing from crc. */
uint32_t cdm_crc32(uint32_t crc, const uint8_t *buf, uint64_t len);
/* The same over n pages (CDM_PAGE_SIZE bytes each, page aligned) in the order
 * of pages[]; the pages are read in address order, not in that order. */
uint32_t cdm_crc32_pages(uint32_t crc, uint8_t *const *pages, uint64_t n);

/* Copies n frames src[i] -> dst[i] (global PFNs), under the mutex; 0 in either
 * is a hole. */
void cdm_copy_frames(struct cdm_machine *m, const uint64_t *src, const uint64_t *dst, uint64_t n);

/*
 * Read duplication (hints.c, the read_mostly advice).
 *
 * duplicate — for each page first + k of [first, first + n) with dst[k] != 0:
 *             a page present on a node (not private, poisoned, locked or
 *             collected by a migration) is copied to frame dst[k] (a frame
 *             the caller holds: cdm_pool_alloc's, no owner) and marked
 *             CDM_PTE_DUPLICATED, in one hold of the mutex, so that no WRITE
 *             slips between copy and mark; done[k] says which were.
 *             Returns how many.
 * collapse  — clears CDM_PTE_DUPLICATED on [first, first + n) (the caller
 *             frees the duplicates' frames).  Returns how many were marked.
 * A migration's new entry and a fault-back's never carry the mark.
 */
uint64_t cdm_region_duplicate(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                              uint64_t n, const uint64_t *dst, uint8_t *done);
uint64_t cdm_region_collapse(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                             uint64_t n);

/* FUSE_NOTIFY_INVAL_INODE for [off, off + len) of inode ino on the /dev/fuse fd.
 * Blocks while the kernel writes dirty pages back.  0, or -errno (-ENOENT:
 * the kernel has nothing cached for the inode). */
int cdm_fuse_inval(int fd, uint64_t ino, int64_t off, int64_t len);
/* Writes back the dirty pages of bytes [off, off + len) of the file open as
 * fd and waits for them (sync_file_range): the kernel sends them in WRITEs
 * of up to max_pages each, where the invalidation that follows would write
 * ("launder") each dirty page in a WRITE of its own.  0 or -errno. */
int cdm_fuse_writeback(int fd, int64_t off, int64_t len);

/*
 * The request router (router.c): owns /dev/fuse and forwards every request
 * to pyfuse3 over a SOCK_SEQPACKET socketpair, replies and notifications
 * back (issue 13, step 1), except READs and WRITEs of the region data
 * mapped with cdm_router_map_data() that cdm_region_serve() can answer
 * (step 2, first part: placed pages only; see there).
 *
 * new          — a router, nothing opened.
 * mount        — opens /dev/fuse, makes the socketpair (buffers a whole
 *                1 MiB WRITE fits in; needs CAP_NET_ADMIN, as mount(2) needs
 *                CAP_SYS_ADMIN), and mounts: source fsname, type
 *                fuse.SUBTYPE, MS_NOSUID | MS_NODEV, data "fd=N,rootmode=
 *                40000,user_id=U,group_id=G" plus options (comma-separated
 *                kernel options: default_permissions, allow_other), as
 *                libfuse's mount.c does.  0 or -errno, nothing left open.
 * start        — starts the threads (readers, reply, notifier; named
 *                cdmfs-router, cdmfs-reply, cdmfs-notify; all signals
 *                blocked).  0 or -errno.
 * python_fd    — pyfuse3's end: pyfuse3.init(ops, "/dev/fd/N", ...).  libfuse
 *                owns it from then on (closes it in fuse_session_destroy).
 * fuse_fd      — the mounted /dev/fuse (O_NONBLOCK), for the daemon's own
 *                notifications (cdm_fuse_inval): write them from a thread
 *                that delivers no replies.
 * event_fd     — an eventfd that becomes readable when the router has ended
 *                or lost its Python side: state says which.  Python then
 *                ends pyfuse3's loop (pyfuse3.terminate()).
 * init_params  — what INIT carried both ways (done once its reply passed).
 * route        — on != 0: requests of opcode (< 64; not INIT nor one without
 *                reply) go to the side channel instead of pyfuse3; 0 or -EINVAL.
 * side_fd      — Python's end of the side channel (SOCK_SEQPACKET, one
 *                request per message, as read from /dev/fuse; the router
 *                closes it in free, and shuts it down in stop: Python reads
 *                its end of file then).
 * reply        — the answer to a side-channel request: error (a positive
 *                errno, or 0 with len bytes of data), written to the
 *                descriptor the request came from.  0, -ENOENT if the
 *                request is not (any longer) awaiting a reply (failed with
 *                EIO when Python went away), -EINVAL, or write(2)'s -errno
 *                (-ENOENT too: the kernel no longer waits for it).
 * stop         — ends and joins the threads; requests still awaiting a
 *                reply fail with EIO.  The mount stays (see free).
 * free         — stop, then closes /dev/fuse (the kernel aborts the
 *                connection if it was the last descriptor) and the rest.
 */
#define CDM_ROUTER_RUNNING 1
#define CDM_ROUTER_UNMOUNTED 2      /* /dev/fuse read ENODEV: unmounted or aborted */
#define CDM_ROUTER_PYTHON_GONE 4    /* Python's end closed: the router answers EIO */
#define CDM_ROUTER_FAILED 8         /* another read error, or no memory */

struct cdm_router_init {
    uint32_t kernel_major, kernel_minor, kernel_max_readahead;  /* fuse_init_in */
    uint32_t kernel_flags, kernel_flags2;
    uint32_t major, minor, max_readahead;                       /* fuse_init_out */
    uint32_t flags, flags2;
    uint32_t max_background, congestion_threshold;
    uint32_t max_write, time_gran, max_pages;
    int32_t error;          /* the reply's error (0: accepted) */
    int32_t done;           /* 1 once the reply has been passed on */
};

struct cdm_router_stats {
    uint64_t requests;      /* read from /dev/fuse */
    uint64_t forwarded;     /* sent to Python */
    uint64_t replies;       /* replies from Python */
    uint64_t notifications; /* notifications from Python (unique 0) */
    uint64_t no_reply;      /* forwarded requests that get none (FORGET, INTERRUPT...) */
    uint64_t failed;        /* answered by the router with an error (Python gone) */
    uint64_t write_errors;  /* writes to /dev/fuse refused (ENOENT: interrupted) */
    uint64_t outstanding;   /* forwarded, awaiting their reply */
    uint64_t side;          /* sent to the side channel */
    uint64_t interrupts_dropped;  /* INTERRUPTs of side-channel requests */
    int32_t last_write_errno, last_read_errno;
    uint64_t served_reads;  /* READs of mapped data answered by the router itself */
    uint64_t served_writes; /* WRITEs likewise */
    uint64_t interrupts_stale;    /* INTERRUPTs of requests awaiting no reply from
                                   * Python (served by the router, or answered) */
    uint64_t spin_hits;     /* requests a reader found while spinning */
    uint64_t spin_misses;   /* spins that ended with nothing: the reader slept */
    uint64_t sleeps;        /* times a reader slept in poll() */
    uint64_t spin_replies;  /* Python's replies a spinning reader delivered */
};

struct cdm_router;

struct cdm_router *cdm_router_new(void);
int cdm_router_mount(struct cdm_router *r, const char *mountpoint, const char *fsname,
                     const char *subtype, const char *options);
int cdm_router_start(struct cdm_router *r);
/* Before start: readers request threads (1..CDM_ROUTER_MAX_READERS; the
 * second and later each on a clone of the /dev/fuse descriptor), and how
 * long, at most, a reader keeps reading after a request before it sleeps
 * (spin_us, 0..CDM_ROUTER_MAX_SPIN_US; 0: never spin).  0, -EINVAL, -EBUSY
 * once started. */
#define CDM_ROUTER_MAX_READERS 4
#define CDM_ROUTER_MAX_SPIN_US 10000
int cdm_router_tune(struct cdm_router *r, uint32_t readers, uint32_t spin_us);
int cdm_router_fuse_fd(struct cdm_router *r);
int cdm_router_python_fd(struct cdm_router *r);
int cdm_router_event_fd(struct cdm_router *r);
int cdm_router_side_fd(struct cdm_router *r);
int cdm_router_route(struct cdm_router *r, uint32_t opcode, int on);
int cdm_router_reply(struct cdm_router *r, uint64_t unique, int32_t error,
                     const void *data, size_t len);
int cdm_router_state(struct cdm_router *r);
void cdm_router_init_params(struct cdm_router *r, struct cdm_router_init *out);
void cdm_router_stats(struct cdm_router *r, struct cdm_router_stats *out);
void cdm_router_stop(struct cdm_router *r);
void cdm_router_free(struct cdm_router *r);

/*
 * Region data served in C (issue 13, step 2).
 *
 * map_data    — READs and WRITEs of inode nodeid are offered to
 *               cdm_region_serve(m, region) first; what it refuses (-EAGAIN)
 *               is forwarded as before.  0, -EEXIST, -ENOMEM.
 * unmap_data  — takes nodeid out, waiting for the router's use of it in
 *               flight (a copy under the machine's mutex, no write to
 *               /dev/fuse): once it returns the router never touches the
 *               region again, which may then be freed.  0 or -ENOENT.
 * data_times  — the CLOCK_REALTIME nanoseconds of the last READ and WRITE of
 *               nodeid the router served since the previous call (0: none),
 *               for atime/mtime; each is reset.  0 or -ENOENT.
 */
int cdm_router_map_data(struct cdm_router *r, uint64_t nodeid, struct cdm_machine *m,
                        struct cdm_region *region);
int cdm_router_unmap_data(struct cdm_router *r, uint64_t nodeid);
int cdm_router_data_times(struct cdm_router *r, uint64_t nodeid, uint64_t *read_ns,
                          uint64_t *write_ns);

/*
 * Attribute files served in C (issue 13, step 3; attr_cache.c).  Python
 * registers an attribute file's inode (its GETATTR answer) when it first
 * hands out its attributes, and publishes its rendered bytes when it
 * renders them; the router answers a read-only OPEN, its READs, FLUSH,
 * FSYNC and RELEASE, and GETATTR, of a registered inode from them.  Bytes
 * are valid while no Python request that may change anything began or
 * ended since the stamp taken before rendering (begin/end bracket those
 * requests), and either no region data READ/WRITE was served by the router
 * since, or they are at most `bound` ns old (default 1 ms).  What is not
 * valid goes to Python on the side channel, as the request itself (OPEN or
 * READ): Python renders, publishes and calls attr_answer.
 *
 * attrs        — the router's cache (owned by the router).
 * register     — (re)registers nodeid with the attributes GETATTR answers
 *                (times in ns; size: 4096 as sysfs, said while the bytes are
 *                not valid -- valid ones say their length, which the kernel
 *                sets after a short READ anyway).  0 or -ENOMEM.
 * stamp        — stamp[0..2] = hard generation (0 while a changing request
 *                is in flight: never valid), soft generation, CLOCK_MONOTONIC
 *                ns; take it before rendering.
 * publish      — the bytes rendered under stamp.  0; 1 if longer than a page
 *                (not kept: the inode is opened FOPEN_DIRECT_IO and its READs
 *                go to Python); -ENOENT if not registered; -ENOMEM.
 * drop         — forgets nodeid.  0 or -ENOENT.
 * begin, end   — around a Python request that may change what attributes show.
 * set_bound    — the tolerance for data-path changes, in ns (0: none).
 * attr_answer  — answers the side-channel request req (OPEN or READ of a
 *                registered inode, as the router sent it) from the bytes just
 *                published.  0; -EAGAIN if they cannot answer it (direct, or
 *                not published: Python answers with reply); -ENOENT if the
 *                request awaits no reply any longer.
 */
#define CDM_ATTR_FH (1ULL << 63)          /* fh of an OPEN the router answered */
#define CDM_ATTR_FH_DIRECT (1ULL << 62)   /* ... with FOPEN_DIRECT_IO */
#define CDM_ATTR_FH_VERSION ((1ULL << 62) - 1)   /* ... the version of the bytes it opened */
#define CDM_ATTR_TIMEOUT 300              /* attr_valid of a GETATTR answered, s */

struct cdm_attr_stats {
    uint64_t entries;       /* registered inodes */
    uint64_t opens;         /* OPENs answered by the router */
    uint64_t kept;          /* ... with FOPEN_KEEP_CACHE */
    uint64_t reads;         /* READs answered from published bytes */
    uint64_t getattrs;      /* GETATTRs answered */
    uint64_t releases;      /* RELEASEs of router-opened files */
    uint64_t open_misses;   /* OPENs sent to Python: bytes not valid */
    uint64_t read_misses;   /* READs sent to Python */
    uint64_t publishes;
    uint64_t changed;       /* publishes whose bytes differed */
    uint64_t invalidations; /* FUSE_NOTIFY_INVAL_INODE of kernel-cached bytes */
    uint64_t attr_invals;   /* attribute-only invalidations (content grew) */
    uint64_t hard, soft;    /* the generations */
    uint64_t busy;          /* changing requests in flight */
    uint64_t kernel_cached; /* entries the kernel's page cache may hold */
};

struct cdm_attr_cache;

struct cdm_attr_cache *cdm_router_attrs(struct cdm_router *r);
int cdm_attr_register(struct cdm_attr_cache *c, uint64_t nodeid, uint32_t mode, uint32_t uid,
                      uint32_t gid, uint64_t size, int64_t atime_ns, int64_t mtime_ns,
                      int64_t ctime_ns);
void cdm_attr_stamp(struct cdm_attr_cache *c, uint64_t *stamp);
int cdm_attr_publish(struct cdm_attr_cache *c, uint64_t nodeid, const uint64_t *stamp,
                     const void *data, size_t len);
int cdm_attr_drop(struct cdm_attr_cache *c, uint64_t nodeid);
void cdm_attr_begin(struct cdm_attr_cache *c);
void cdm_attr_end(struct cdm_attr_cache *c);
void cdm_attr_set_bound(struct cdm_attr_cache *c, uint64_t ns);
void cdm_attr_stats(struct cdm_attr_cache *c, struct cdm_attr_stats *out);
int cdm_router_attr_answer(struct cdm_router *r, const void *req, size_t len);

/*
 * Introspection of a region's pages (numa_maps, pagemap, mbind).
 *
 * census   — adds the pages of [first, first + n) to present[pool] and, for
 *            those with CDM_PTE_DIRTY, to dirty[pool] (CDM_MAX_POOLS entries
 *            each).  Poisoned pages and placeholders are not counted.
 * pagemap  — one /proc/PID/pagemap entry per page of [first, first + n) into
 *            out, as fs/proc/task_mmu.c pte_to_pagemap_entry() writes it for
 *            a private anonymous page mapped by one process (no PM_FILE):
 *            a page the CPU can map is PM_PRESENT | PM_MMAP_EXCLUSIVE with
 *            its PFN in bits 0-54; a device-private page is PM_SWAP with the
 *            swap-style frame SWP_DEVICE_WRITE | PFN << MAX_SWAPFILES_SHIFT
 *            (the kernel's writable device-private entry); a poisoned page
 *            is PM_SWAP with SWP_HWPOISON | old PFN << MAX_SWAPFILES_SHIFT;
 *            0 for a page never touched (or beyond the end).  Without
 *            show_pfn the whole frame field (PFN, or swap type and offset)
 *            is 0, as the kernel shows it only with CAP_SYS_ADMIN.  Swap
 *            entries get no PM_MMAP_EXCLUSIVE: the kernel sets it only with
 *            PM_PRESENT.  Soft-dirty (bit 55) is not modelled.
 * misfits  — pages of [first, first + n) on a node where a policy does not
 *            want them.  A page fits if its pool's bit is in fit_pools or it
 *            is in pool table[i % ntable] (i: its page index); absent and
 *            poisoned pages and pages in skip_pools (device-private) are not
 *            looked at.  The misfits are returned as runs of consecutive
 *            pages with the same wanted pool table[i % ntable]: run_first,
 *            run_len, run_pool, at most max runs.  Returns the number of
 *            misfit pages (all of them, even past max runs); *nruns gets the
 *            runs written.
 */
/* pagemap entry bits: PM_* of fs/proc/task_mmu.c (Documentation/admin-guide/mm/pagemap.rst). */
#define CDM_PM_PFN_MASK 0x7fffffffffffffULL   /* bits 0-54: PM_PFRAME_MASK */
#define CDM_PM_MMAP_EXCLUSIVE (1ULL << 56)    /* page mapped by this process only */
#define CDM_PM_FILE (1ULL << 61)              /* file page or shared anon: never set here */
#define CDM_PM_SWAP (1ULL << 62)
#define CDM_PM_PRESENT (1ULL << 63)
/* The frame field of a PM_SWAP entry is swp_type | swp_offset << MAX_SWAPFILES_SHIFT
 * (task_mmu.c); for the pfn swap entries used here the offset is the PFN.
 * include/linux/swap.h: swap types have MAX_SWAPFILES_SHIFT (5) bits, and the
 * highest types are kept for special entries, leaving real swap files
 * MAX_SWAPFILES = (1 << MAX_SWAPFILES_SHIFT) - SWP_DEVICE_NUM -
 * SWP_MIGRATION_NUM - SWP_HWPOISON_NUM - SWP_PTE_MARKER_NUM.  With CONFIG_DEVICE_PRIVATE
 * (SWP_DEVICE_NUM 3: WRITE, READ, EXCLUSIVE, since v6.15), CONFIG_MIGRATION
 * (SWP_MIGRATION_NUM 3), CONFIG_MEMORY_FAILURE (SWP_HWPOISON_NUM 1) and PTE
 * markers (SWP_PTE_MARKER_NUM 1), as a distribution kernel has them, that is
 * 32 - 3 - 3 - 1 - 1 = 24; SWP_HWPOISON = MAX_SWAPFILES and SWP_DEVICE_WRITE
 * = MAX_SWAPFILES + SWP_HWPOISON_NUM + SWP_MIGRATION_NUM.  (v6.5-v6.14, with
 * four device types, had MAX_SWAPFILES 23; the types shift with the config.) */
#define CDM_MAX_SWAPFILES_SHIFT 5
#define CDM_MAX_SWAPFILES ((1 << CDM_MAX_SWAPFILES_SHIFT) - 3 - 3 - 1 - 1)
#define CDM_SWP_HWPOISON CDM_MAX_SWAPFILES
#define CDM_SWP_DEVICE_WRITE (CDM_MAX_SWAPFILES + 1 + 3)   /* + SWP_HWPOISON_NUM + SWP_MIGRATION_NUM */

void cdm_region_census(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                       uint64_t *present, uint64_t *dirty);
void cdm_region_pagemap(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                        uint64_t *out, int show_pfn);
uint64_t cdm_region_misfits(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                            uint64_t n, const int32_t *table, uint32_t ntable,
                            uint64_t fit_pools, uint64_t skip_pools, uint64_t *run_first,
                            uint64_t *run_len, int32_t *run_pool, uint64_t max, uint64_t *nruns);

/*
 * Lifecycle of memory (memory blocks, hot-add, device offline, memory
 * failure, long-term pins).  The invariant that keeps the allocator exact:
 * the free stack holds exactly the free frames below next_fresh that are
 * neither retired nor in an isolated block; frames at or above next_fresh
 * are free unless retired, and the bump allocator skips retired frames and
 * isolated blocks.  CDM_FRAME_USED marks every frame handed out.
 *
 * set_blocks   — cuts a pool into blocks of block_pages frames (its base_pfn
 *                a multiple of it; the last block may be short).  Once.
 * block_isolate— isolate != 0: no allocation from the block any more (its
 *                free frames leave the free stack; a page on it counts as
 *                leaving: cdm_migrate_collect moves it even to its own pool);
 *                isolate == 0: its free frames return to the allocator, once.
 *                Returns the free frames given back (0 when isolating).
 * pool_isolate — the same for a whole pool, without touching the free stack
 *                (a device going offline: its memory takes no new page).
 * frames_census— of the frames [pfn, pfn + n) of one pool: how many are used
 *                (out[0]) and retired (out[1]).
 * frames_owners— the (region id, page) owners of the used frames of [pfn,
 *                pfn + n), at most max; *next gets the first PFN not looked
 *                at (pfn + n when done, 2^64 - 1 if that wraps).  Returns
 *                how many were written.
 * frame_retire — takes a frame out of use for good with flags (RETIRED and
 *                maybe POISONED): a free frame at once (returns 0), a used
 *                one when its page leaves it (returns 1); -EALREADY if it was
 *                retired already, -EINVAL outside every pool.
 * frames_unretire — gives retired frames of [pfn, pfn + n) back (a used one
 *                just loses its pending retirement).  Returns how many.
 * page_poison  — the frame pfn that page of r lives on has failed: the page
 *                loses its data and its frame (the entry keeps POISONED and
 *                the old PFN, for pagemap), the frame is retired.  0, -ENOENT
 *                (the page is not on that frame), -EAGAIN (under migration).
 * region_poison_pool — page_poison for every page of [first, first + n) of
 *                r whose frame is in pool (link loss).  Returns how many;
 *                *busy gets the pages skipped because a migration holds them.
 * region_pin   — pin != 0: sets CDM_PTE_PINNED on every page of [first,
 *                first + n), all or none: -EIO poisoned, -EAGAIN under
 *                migration, -ENOENT absent (also: the range runs past the
 *                end), -EREMOTE on a pool of deny_pools (res->page);
 *                res->allocated gets the pages newly pinned.
 *                pin == 0: clears it where set (res->allocated: how many).
 */
int cdm_pool_set_blocks(struct cdm_machine *m, int pool, uint64_t block_pages);
int64_t cdm_block_isolate(struct cdm_machine *m, int pool, uint64_t block, int isolate);
void cdm_pool_isolate(struct cdm_machine *m, int pool, int isolate);
void cdm_frames_census(struct cdm_machine *m, uint64_t pfn, uint64_t n, uint64_t *out);
uint64_t cdm_frames_owners(struct cdm_machine *m, uint64_t pfn, uint64_t n, uint32_t *region,
                           uint64_t *page, uint64_t max, uint64_t *next);
int cdm_frame_retire(struct cdm_machine *m, uint64_t pfn, int flags);
uint64_t cdm_frames_unretire(struct cdm_machine *m, uint64_t pfn, uint64_t n);
int cdm_page_poison(struct cdm_machine *m, struct cdm_region *r, uint64_t page, uint64_t pfn);
uint64_t cdm_region_poison_pool(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                uint64_t n, int pool, uint64_t *busy);
int cdm_region_pin(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                   int pin, uint64_t deny_pools, struct cdm_rw_result *res);

/*
 * Debugging: the invariants of the whole machine, checked from scratch under
 * the mutex.  regions must be every region alive on m (their ids distinct).
 * Verifies:
 *  - no frame drop is pending (see struct cdm_machine);
 *  - per pool: the free stack holds exactly the free frames below next_fresh
 *    that are neither retired nor in an isolated block, each once, stale ones
 *    only in the resident window; no frame at or above next_fresh is used or
 *    stale; POISONED implies RETIRED; free frames have no owner; nr_used,
 *    nr_retired (free retired frames) and nr_held (used frames without owner)
 *    equal the counts over the frame flags;
 *  - per page-table entry: none beyond npages, no internal PTE_NEW, a present
 *    entry's frame is USED, handed out, of the pool the entry names (PRIVATE
 *    bit as the pool's), its reverse map names this region and page, and no
 *    other entry points at it; an entry without frame is poisoned (its old
 *    PFN only) or a migration's placeholder; no entry is LOCKED and
 *    MIGRATING at once;
 *  - every frame with an owner is the frame of the page its owner names;
 *  - per region: npages is size rounded up to pages; resident[], nr_pinned,
 *    nr_poisoned; per pool: nr_mapped, nr_dirty, nr_pinned, equal to the
 *    counts over the page tables;
 *  - the populated index never hides a non-zero entry: its chunk is marked
 *    and the chunk's bitmap word has its summary bit.
 * Migrations may be in flight: their LOCKED/MIGRATING entries are checked as
 * above and their target frames are the used frames without owner (nr_held),
 * which the check can count but not tell from frames cdm_pool_alloc handed
 * out.  Frame contents are not looked at.  Returns 0, or -EINVAL with a
 * one-line description of the first violation found in msg (msglen bytes,
 * NUL-terminated).  Cost: every frame flag below each pool's next_fresh and
 * every page of the page tables the host has backed.
 */
int cdm_machine_check(struct cdm_machine *m, struct cdm_region *const *regions,
                      uint64_t nregions, char *msg, uint64_t msglen);

#endif
