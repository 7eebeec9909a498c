/*
 * internal.h — what the parts of the core share and Python never sees (the
 * kernel's mm/internal.h): page-table entry accessors, the populated index's
 * inline helpers, page accounting, and the functions one part calls in another.
 * Each mm part defines _GNU_SOURCE, then includes this first.
 */
#ifndef CDM_INTERNAL_H
#define CDM_INTERNAL_H

#include "cdmcore.h"

#include <sys/mman.h>

#define PAGE CDM_PAGE_SIZE
/* Internal: a first touch of the cdm_region_rw, cdm_region_serve or
 * cdm_region_populate call under way (its frame is zero: frame_alloc); never
 * left in an entry when the call returns (cdmcore.h reserves bit 48 for it). */
#define PTE_NEW (1ULL << 48)

static inline void *sparse_map(uint64_t bytes)
{
    void *p = mmap(NULL, bytes ? bytes : PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static inline uint64_t pte_pfn(uint64_t pte) { return pte & CDM_PTE_PFN_MASK; }
static inline int pte_pool(uint64_t pte) { return (int)((pte & CDM_PTE_POOL_MASK) >> CDM_PTE_POOL_SHIFT); }

static inline uint64_t make_pte(struct cdm_machine *m, int pool, uint64_t pfn)
{
    uint64_t pte = CDM_PTE_PRESENT | ((uint64_t)pool << CDM_PTE_POOL_SHIFT) | pfn;
    if (m->pools[pool].flags & CDM_POOL_PRIVATE)
        pte |= CDM_PTE_PRIVATE;
    return pte;
}

static inline uint8_t *frame_addr(struct cdm_machine *m, uint64_t pte)
{
    struct cdm_pool *p = &m->pools[pte_pool(pte)];
    return p->base + (pte_pfn(pte) - p->base_pfn) * PAGE;
}

/* Whether pool is one of m's (an index a caller passed in).  Caller holds
 * m->lock (see pfn_pool). */
static inline int pool_valid(const struct cdm_machine *m, int pool)
{
    return pool >= 0 && pool < m->npools;
}

/* Whether frame f of pool p is in an isolated memory block. */
static inline int block_isolated(const struct cdm_pool *p, uint64_t f)
{
    return p->block_pages && (p->bflags[f / p->block_pages] & CDM_BLOCK_ISOLATED);
}

/*
 * Defined in one part, called from others; see the comments at the
 * definitions.  Hidden: the module exports only the cdm_* entry points, and
 * calls within the core need no PLT.
 */
#pragma GCC visibility push(hidden)

/* page_alloc.c: the free stack and frames.  Caller holds m->lock. */
void drop_flush(struct cdm_machine *m);
void drop_frame(struct cdm_machine *m, struct cdm_pool *p, uint64_t f);
int stack_push(struct cdm_machine *m, struct cdm_pool *p, uint64_t f);
void stack_remove(struct cdm_machine *m, struct cdm_pool *p, uint64_t lo, uint64_t hi);
int64_t frame_alloc(struct cdm_machine *m, struct cdm_pool *p, int zero);
void frame_free(struct cdm_machine *m, struct cdm_pool *p, uint64_t f);
void frame_unalloc(struct cdm_pool *p, uint64_t f);

/* page_alloc.c: the NUMA events of a page allocated on pool (zone_statistics).
 * Caller holds m->lock. */
void numa_count(struct cdm_machine *m, int pool, int preferred, int local);
void numa_account(struct cdm_machine *m, uint64_t idx, int pool, const struct cdm_plan *plan);

/* page_alloc.c: the pool of a PFN, the frames of a PFN range that are in one
 * pool.  Caller holds m->lock: npools and the pools it counts are written by
 * cdm_pool_add() under it, and read only under it. */
int pfn_pool(struct cdm_machine *m, uint64_t pfn);
uint8_t *pfn_addr(struct cdm_machine *m, uint64_t pfn);
int frame_range(struct cdm_machine *m, uint64_t pfn, uint64_t n, uint64_t *lo, uint64_t *hi);

/* mempolicy.c: the published plan placing pages [first, last] of r on a
 * first touch from a CPU of pool local, or NULL (Python's to place).  Caller
 * holds m->lock.  And the frees of the policy tables. */
const struct cdm_plan *fault_plan(struct cdm_machine *m, const struct cdm_region *r,
                                  uint64_t first, uint64_t last, int32_t local);
void region_policies_free(struct cdm_region_policies *p);
void machine_policies_free(struct cdm_machine *m);

/* migrate.c: the fault-back log (cdm_machine_take_faultbacks): whether it
 * has room for entries more, and one entry.  Caller holds m->lock. */
int faultback_room(struct cdm_machine *m, uint64_t entries);
void faultback_log(struct cdm_machine *m, uint32_t region, int pool, int to, uint64_t first, uint64_t n,
                   uint64_t moved);
void machine_faultbacks_free(struct cdm_machine *m);

/* trace.c: a record of the trace ring (m->trace exists while trace_mask is set). */
void trace_record(struct cdm_machine *m, uint32_t kind, uint32_t region, uint32_t pid,
                  int32_t pool, uint64_t first, uint64_t n);
void machine_trace_free(struct cdm_machine *m);

/* pagetable.c: walks of the populated index. */
int next_populated_span(const struct cdm_region *r, uint64_t from, uint64_t end,
                        uint64_t *lo, uint64_t *hi);

/* attr_cache.c: the router's side (see there).  attr_cache_handle answers
 * req into out (returns the reply's length), or says where it goes:
 * ATTR_SIDE (Python's side channel: the bytes are stale) or ATTR_FORWARD
 * (not an attribute the router serves).  force: the bytes were just
 * published for this request (cdm_router_attr_answer). */
#define ATTR_SIDE 0
#define ATTR_FORWARD (-1)
struct cdm_attr_cache *attr_cache_new(void);
int attr_cache_start(struct cdm_attr_cache *c, int fuse_fd);
void attr_cache_stop(struct cdm_attr_cache *c);
void attr_cache_free(struct cdm_attr_cache *c);
void attr_cache_data_changed(struct cdm_attr_cache *c);
int attr_cache_handle(struct cdm_attr_cache *c, const unsigned char *req, size_t len, int force,
                      unsigned char *out, size_t outsize);

#pragma GCC visibility pop

/* ------------------------------------------------------------- locking */

/* One discipline for every entry point that touches shared state (pools,
 * frames, their bytes, page tables): machine_lock() on entry, machine_unlock()
 * on every way out.  machine_unlock() issues the drops still pending (see
 * drop_flush), so that no MADV_DONTNEED of a freed frame can run after another
 * thread has taken the lock, been given that frame and written it. */
static inline void machine_lock(struct cdm_machine *m)
{
    pthread_mutex_lock(&m->lock);
}

static inline void machine_unlock(struct cdm_machine *m)
{
    drop_flush(m);
    pthread_mutex_unlock(&m->lock);
}

/* ------------------------------------------------------- page accounting */

/* Every change of a page's frame or of its counted flags goes through these
 * two, so pool and region counters never drift from the page tables. */
static inline void page_account(struct cdm_machine *m, struct cdm_region *r, uint64_t pte, int sign)
{
    if (!(pte & CDM_PTE_PRESENT))
        return;
    struct cdm_pool *p = &m->pools[pte_pool(pte)];
    r->resident[pte_pool(pte)] += sign;
    if (pte & CDM_PTE_DUPLICATED)
        r->nr_duplicated += sign;
    if (pte & CDM_PTE_CPU)
        p->nr_mapped += sign;
    if (pte & CDM_PTE_DIRTY)
        p->nr_dirty += sign;
    if (pte & CDM_PTE_PINNED)
        p->nr_pinned += sign;
}

/* ------------------------------------------------------ populated index */

/* See struct cdm_region: a chunk is CDM_CHUNK_PAGES entries, one 4 KiB page
 * of the pte mapping, so a chunk never marked is also a page of the mapping
 * the host never had to back. */
#define CHUNK_SHIFT 9
#define CHUNK CDM_CHUNK_PAGES
_Static_assert(CHUNK == 1 << CHUNK_SHIFT && CHUNK * sizeof(uint64_t) == PAGE,
               "a chunk is one page of the pte mapping");

/* Entry i is about to hold something.  Caller holds m->lock. */
static inline void chunk_mark(struct cdm_region *r, uint64_t i)
{
    uint64_t c = i >> CHUNK_SHIFT, w = c >> 6, bit = 1ULL << (c & 63);
    if (!(r->chunks[w] & bit)) {
        r->chunks[w] |= bit;
        r->summary[w >> 6] |= 1ULL << (w & 63);
    }
}

/* Chunk c is known to be all zero.  Caller holds m->lock. */
static inline void chunk_clear(struct cdm_region *r, uint64_t c)
{
    uint64_t w = c >> 6;
    r->chunks[w] &= ~(1ULL << (c & 63));
    if (!r->chunks[w])
        r->summary[w >> 6] &= ~(1ULL << (w & 63));
}

/* A walk read the entries of [lo, hi), seen is their OR after it: when that is
 * zero and the stretch is the whole chunk (up to npages), the mark was stale. */
static inline void span_settle(struct cdm_region *r, uint64_t lo, uint64_t hi, uint64_t seen)
{
    uint64_t base = lo & ~(uint64_t)(CHUNK - 1);
    if (!seen && lo == base && (hi == base + CHUNK || hi >= r->npages))
        chunk_clear(r, lo >> CHUNK_SHIFT);
}

/* The end of a walk over [first, first + n): never past npages, and never
 * before first, so that the walk is empty when first is beyond the end. */
static inline uint64_t walk_end(const struct cdm_region *r, uint64_t first, uint64_t n)
{
    if (first >= r->npages)
        return first;
    return n < r->npages - first ? first + n : r->npages;
}

/* Whether page first + k of a range exists: first + k below npages, without
 * the sum wrapping around (first comes from callers, and a page past 2^64
 * must not alias page 0). */
static inline int range_page(const struct cdm_region *r, uint64_t first, uint64_t k)
{
    return first < r->npages && k < r->npages - first;
}

/* Whether the range [first, first + n) lies inside [0, npages). */
static inline int range_inside(const struct cdm_region *r, uint64_t first, uint64_t n)
{
    return n <= r->npages && first <= r->npages - n;
}

/* Every write of an entry goes through pte_store() (or pte_set(), which also
 * keeps the counters), so that no non-zero entry is ever outside a marked
 * chunk.  Caller holds m->lock. */
static inline void pte_store(struct cdm_region *r, uint64_t i, uint64_t pte)
{
    if (pte)
        chunk_mark(r, i);
    r->pte[i] = pte;
}

static inline void pte_set(struct cdm_machine *m, struct cdm_region *r, uint64_t i, uint64_t pte)
{
    page_account(m, r, r->pte[i], -1);
    pte_store(r, i, pte);
    page_account(m, r, pte, +1);
}

#endif
