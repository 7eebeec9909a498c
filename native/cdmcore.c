/* cdmcore — see cdmcore.h for what lives here and why. */
#define _GNU_SOURCE
#include "cdmcore.h"

#include <errno.h>
#include <libdeflate.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define PAGE CDM_PAGE_SIZE
/* Internal: allocated by the cdm_region_rw call under way. */
#define PTE_NEW (1ULL << 48)

static void *sparse_map(uint64_t bytes)
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

/* ---------------------------------------------------------------- pools */

struct cdm_machine *cdm_machine_new(void)
{
    struct cdm_machine *m = calloc(1, sizeof(*m));
    if (m)
        pthread_mutex_init(&m->lock, NULL);
    return m;
}

void cdm_machine_free(struct cdm_machine *m)
{
    for (int i = 0; i < m->npools; i++) {
        struct cdm_pool *p = &m->pools[i];
        munmap(p->base, p->npages * PAGE);
        munmap(p->rmap, p->npages * sizeof(uint64_t));
        munmap(p->fflags, p->npages);
        free(p->free_stack);
        free(p->bflags);
    }
    pthread_mutex_destroy(&m->lock);
    free(m);
}

int cdm_pool_add(struct cdm_machine *m, uint64_t base_pfn, uint64_t npages, int flags)
{
    if (m->npools >= CDM_MAX_POOLS || npages == 0 || base_pfn + npages > CDM_PTE_PFN_MASK)
        return -EINVAL;
    /* A PFN belongs to one pool: cdm_pfn_pool() would find only the first. */
    for (int i = 0; i < m->npools; i++)
        if (base_pfn < m->pools[i].base_pfn + m->pools[i].npages
            && m->pools[i].base_pfn < base_pfn + npages)
            return -EINVAL;
    struct cdm_pool *p = &m->pools[m->npools];
    memset(p, 0, sizeof(*p));
    p->base = sparse_map(npages * PAGE);
    p->rmap = sparse_map(npages * sizeof(uint64_t));
    p->fflags = sparse_map(npages);
    if (!p->base || !p->rmap || !p->fflags)
        return -ENOMEM;
    p->base_pfn = base_pfn;
    p->npages = npages;
    p->flags = flags;
    return m->npools++;
}

uint64_t cdm_pool_free_pages(struct cdm_machine *m, int pool)
{
    struct cdm_pool *p = &m->pools[pool];
    return p->npages - p->nr_used - p->nr_retired;
}

/* Freed frames give their host memory back with madvise(MADV_DONTNEED), which
 * also makes them read as zeros for the next user.  The newest
 * CDM_RESIDENT_FREE_PAGES frees of a pool are kept (CDM_FRAME_STALE) and
 * dropped only as newer ones push them out: a host page fault costs more than
 * the copy into the page, and device memory is always backed.  Consecutive
 * drops of adjacent frames (a migrated batch, a truncated range) are gathered
 * into one call: drop_flush() runs before any allocation and before m->lock
 * is released, so no frame is reused before it is dropped. */
static __thread struct { struct cdm_pool *pool; uint64_t start, len; } drop;

static void drop_flush(void)
{
    if (drop.len)
        madvise(drop.pool->base + drop.start * PAGE, drop.len * PAGE, MADV_DONTNEED);
    drop.len = 0;
}

static void drop_frame(struct cdm_pool *p, uint64_t f)
{
    if (drop.len && drop.pool == p && f == drop.start + drop.len) {
        drop.len++;
        return;
    }
    if (drop.len && drop.pool == p && f + 1 == drop.start) {
        drop.start--;
        drop.len++;
        return;
    }
    drop_flush();
    drop.pool = p;
    drop.start = f;
    drop.len = 1;
}

/* Whether frame f of pool p is in an isolated memory block. */
static inline int block_isolated(const struct cdm_pool *p, uint64_t f)
{
    return p->block_pages && (p->bflags[f / p->block_pages] & CDM_BLOCK_ISOLATED);
}

/* Whether the frame a present entry points at is on its way out (its block
 * or pool is being offlined, or it is to be retired): its page moves even to
 * its own pool. */
static inline int frame_leaving(struct cdm_machine *m, uint64_t pte)
{
    struct cdm_pool *p = &m->pools[pte_pool(pte)];
    uint64_t f = pte_pfn(pte) - p->base_pfn;
    return (p->flags & CDM_POOL_ISOLATED) || (p->fflags[f] & CDM_FRAME_RETIRED)
        || block_isolated(p, f);
}

/* Free frame f leaves the allocator's reach (isolated, retired): its bytes go. */
static void frame_unstale(struct cdm_pool *p, uint64_t f)
{
    if (p->fflags[f] & CDM_FRAME_STALE) {
        p->fflags[f] &= (uint8_t)~CDM_FRAME_STALE;
        drop_frame(p, f);
    }
}

/* Pushes free frame f on the free stack; -1 if the host has no memory for
 * it (the frame is then leaked as retired).  Caller holds m->lock. */
static int stack_push(struct cdm_pool *p, uint64_t f)
{
    if (p->nfree_stack == p->free_cap) {
        uint64_t cap = p->free_cap ? p->free_cap * 2 : 1024;
        uint64_t *s = realloc(p->free_stack, cap * sizeof(uint64_t));
        if (!s) {
            p->fflags[f] |= CDM_FRAME_RETIRED;
            p->nr_retired++;
            return -1;
        }
        p->free_stack = s;
        p->free_cap = cap;
    }
    p->free_stack[p->nfree_stack++] = f;
    /* The entry pushed out of the resident window loses its bytes. */
    if (++p->nresident > CDM_RESIDENT_FREE_PAGES) {
        frame_unstale(p, p->free_stack[p->nfree_stack - p->nresident]);
        p->nresident--;
    }
    return 0;
}

/* Removes the frames [lo, hi) from the free stack.  Caller holds m->lock. */
static void stack_remove(struct cdm_pool *p, uint64_t lo, uint64_t hi)
{
    uint64_t k = 0;
    for (uint64_t j = 0; j < p->nfree_stack; j++)
        if (p->free_stack[j] < lo || p->free_stack[j] >= hi)
            p->free_stack[k++] = p->free_stack[j];
        else
            frame_unstale(p, p->free_stack[j]);
    p->nfree_stack = k;
    if (p->nresident > k)
        p->nresident = k;
}

/* The next never-used frame for the bump allocator, skipping retired frames
 * and isolated blocks, or -1.  Caller holds m->lock. */
static int64_t fresh_frame(struct cdm_pool *p)
{
    while (p->next_fresh < p->npages) {
        uint64_t f = p->next_fresh;
        if (block_isolated(p, f)) {
            uint64_t end = (f / p->block_pages + 1) * p->block_pages;
            p->next_fresh = end < p->npages ? end : p->npages;
            continue;
        }
        p->next_fresh++;
        if (!(p->fflags[f] & CDM_FRAME_RETIRED))
            return (int64_t)f;
    }
    return -1;
}

/* One frame index of pool p, or -1; zero: its bytes must read as zeros (a
 * new page), else the caller overwrites them all (a migration's copy).
 * Caller holds m->lock. */
static int64_t frame_alloc(struct cdm_pool *p, int zero)
{
    drop_flush();
    if (p->flags & CDM_POOL_ISOLATED)
        return -1;
    if (p->fail_alloc) {
        p->fail_alloc--;
        return -1;
    }
    int64_t f;
    if (p->nfree_stack) {
        f = (int64_t)p->free_stack[--p->nfree_stack];
        if (p->nresident)
            p->nresident--;
    } else if ((f = fresh_frame(p)) < 0) {
        return -1;
    }
    if (p->fflags[f] & CDM_FRAME_STALE) {
        p->fflags[f] &= (uint8_t)~CDM_FRAME_STALE;
        if (zero)
            memset(p->base + (uint64_t)f * PAGE, 0, PAGE);
    }
    p->fflags[f] |= CDM_FRAME_USED;
    p->nr_used++;
    p->counters[CDM_PGALLOC]++;
    return f;
}

/* Returns frame f of pool p to the allocator, keeping its bytes for a while
 * (see drop_frame); a frame that cannot be reused soon is dropped at once.
 * Caller holds m->lock. */
static void frame_free(struct cdm_pool *p, uint64_t f)
{
    p->rmap[f] = 0;
    p->fflags[f] &= ~CDM_FRAME_USED;
    p->nr_used--;
    p->counters[CDM_PGFREE]++;
    if (p->fflags[f] & CDM_FRAME_RETIRED) {
        drop_frame(p, f);
        p->nr_retired++;
        return;
    }
    int in_isolated_block = block_isolated(p, f);
    if (in_isolated_block || (p->flags & CDM_POOL_ISOLATED)) {
        drop_frame(p, f);
        if (in_isolated_block)
            return;     /* back to the allocator when the block is released */
    } else {
        p->fflags[f] |= CDM_FRAME_STALE;
    }
    /* Out of host memory for the free list, stack_push leaks the frame as
     * retired rather than corrupt the allocator. */
    if (stack_push(p, f) < 0)
        frame_unstale(p, f);
}

/* Undoes the latest frame_alloc() of pool p that is still standing (calls
 * backing out, newest first): the frame goes back where it came from and no
 * event is counted, so an all-or-nothing call that fails changes nothing.
 * The frame must not have been written.  Caller holds m->lock. */
static void frame_unalloc(struct cdm_pool *p, uint64_t f)
{
    p->rmap[f] = 0;
    p->fflags[f] &= ~CDM_FRAME_USED;
    p->nr_used--;
    p->counters[CDM_PGALLOC]--;
    if (f + 1 == p->next_fresh)
        p->next_fresh--;
    else {
        p->free_stack[p->nfree_stack++] = f;  /* the slot it was popped from */
        p->nresident++;
    }
}

int cdm_pool_alloc(struct cdm_machine *m, int pool, uint64_t n, uint64_t *out)
{
    struct cdm_pool *p = &m->pools[pool];
    pthread_mutex_lock(&m->lock);
    for (uint64_t i = 0; i < n; i++) {
        int64_t f = frame_alloc(p, 1);
        if (f < 0) {
            while (i--)
                frame_unalloc(p, out[i] - p->base_pfn);
            drop_flush();
    pthread_mutex_unlock(&m->lock);
            return -ENOMEM;
        }
        out[i] = p->base_pfn + (uint64_t)f;
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return 0;
}

int cdm_pfn_pool(struct cdm_machine *m, uint64_t pfn)
{
    for (int i = 0; i < m->npools; i++) {
        struct cdm_pool *p = &m->pools[i];
        if (pfn >= p->base_pfn && pfn < p->base_pfn + p->npages)
            return i;
    }
    return -1;
}

void cdm_pool_free(struct cdm_machine *m, const uint64_t *pfns, uint64_t n)
{
    pthread_mutex_lock(&m->lock);
    for (uint64_t i = 0; i < n; i++) {
        int pool = cdm_pfn_pool(m, pfns[i]);
        if (pool >= 0)
            frame_free(&m->pools[pool], pfns[i] - m->pools[pool].base_pfn);
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
}

uint8_t *cdm_pfn_addr(struct cdm_machine *m, uint64_t pfn)
{
    int pool = cdm_pfn_pool(m, pfn);
    if (pool < 0)
        return NULL;
    return m->pools[pool].base + (pfn - m->pools[pool].base_pfn) * PAGE;
}

int cdm_pfn_owner(struct cdm_machine *m, uint64_t pfn, uint32_t *region, uint64_t *page)
{
    int pool = cdm_pfn_pool(m, pfn);
    if (pool < 0)
        return -EINVAL;
    pthread_mutex_lock(&m->lock);
    uint64_t owner = m->pools[pool].rmap[pfn - m->pools[pool].base_pfn];
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    if (!owner)
        return -ENOENT;
    *region = (uint32_t)((owner >> 40) - 1);
    *page = owner & CDM_PTE_PFN_MASK;
    return 0;
}

/* ------------------------------------------------------- page accounting */

/* Every change of a page's frame or of its counted flags goes through these
 * two, so pool and region counters never drift from the page tables. */
static void page_account(struct cdm_machine *m, struct cdm_region *r, uint64_t pte, int sign)
{
    if (!(pte & CDM_PTE_PRESENT))
        return;
    struct cdm_pool *p = &m->pools[pte_pool(pte)];
    r->resident[pte_pool(pte)] += sign;
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

static inline uint64_t chunk_base(uint64_t c) { return c << CHUNK_SHIFT; }

/* Bytes of the three sparse mappings of a region with cap entries (cap is a
 * multiple of CHUNK): whole pages, as mremap() wants them. */
static inline uint64_t page_round(uint64_t bytes) { return (bytes + PAGE - 1) & ~(uint64_t)(PAGE - 1); }
static inline uint64_t words_for(uint64_t bits) { return (bits + 63) >> 6; }
static inline uint64_t pte_bytes(uint64_t cap) { return cap * sizeof(uint64_t); }
static inline uint64_t chunks_bytes(uint64_t cap)
{
    return page_round(words_for(cap >> CHUNK_SHIFT) * sizeof(uint64_t));
}
static inline uint64_t summary_bytes(uint64_t cap)
{
    return page_round(words_for(words_for(cap >> CHUNK_SHIFT)) * sizeof(uint64_t));
}

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
static void chunk_clear(struct cdm_region *r, uint64_t c)
{
    uint64_t w = c >> 6;
    r->chunks[w] &= ~(1ULL << (c & 63));
    if (!r->chunks[w])
        r->summary[w >> 6] &= ~(1ULL << (w & 63));
}

/* Clears chunk c if its entries below npages are all zero (those beyond are
 * zero anyway).  Costs one chunk: for a chunk a call has just emptied in part. */
static void chunk_settle(struct cdm_region *r, uint64_t c)
{
    if (!(r->chunks[c >> 6] & (1ULL << (c & 63))))
        return;
    uint64_t lo = chunk_base(c), hi = lo + CHUNK < r->npages ? lo + CHUNK : r->npages;
    uint64_t seen = 0;
    for (uint64_t i = lo; i < hi; i++)
        seen |= r->pte[i];
    if (!seen)
        chunk_clear(r, c);
}

/* The first marked chunk of [c, cend), or cend.  The summary skips 64 words
 * (2^21 entries) per word read, so this is microseconds even over 2^34
 * entries; cend must not exceed the chunks cap reserves. */
static uint64_t next_populated_chunk(const struct cdm_region *r, uint64_t c, uint64_t cend)
{
    uint64_t wend = words_for(cend);
    while (c < cend) {
        uint64_t w = c >> 6;
        uint64_t bits = r->chunks[w] & (~0ULL << (c & 63));
        if (bits) {
            c = (w << 6) + (uint64_t)__builtin_ctzll(bits);
            return c < cend ? c : cend;
        }
        /* Nothing more in word w: the next word the summary says is not zero. */
        uint64_t v = w + 1;
        for (;;) {
            if (v >= wend)
                return cend;
            uint64_t s = r->summary[v >> 6] & (~0ULL << (v & 63));
            if (s) {
                v = (v & ~63ULL) + (uint64_t)__builtin_ctzll(s);
                break;
            }
            v = (v | 63) + 1;
        }
        if (v >= wend)
            return cend;
        c = v << 6;
    }
    return cend;
}

/* The last marked chunk of [cfloor, c), or -1: next_populated_chunk
 * backwards, for walks that must go from the last page down. */
static int64_t prev_populated_chunk(const struct cdm_region *r, uint64_t cfloor, uint64_t c)
{
    uint64_t wfloor = cfloor >> 6;
    while (c > cfloor) {
        uint64_t last = c - 1, w = last >> 6;
        uint64_t bits = r->chunks[w] & (~0ULL >> (63 - (last & 63)));
        if (bits) {
            uint64_t found = (w << 6) + 63 - (uint64_t)__builtin_clzll(bits);
            return found >= cfloor ? (int64_t)found : -1;
        }
        if (w <= wfloor)
            return -1;
        uint64_t v = w - 1;
        for (;;) {
            uint64_t s = r->summary[v >> 6] & (~0ULL >> (63 - (v & 63)));
            if (s) {
                v = (v & ~63ULL) + 63 - (uint64_t)__builtin_clzll(s);
                break;
            }
            if (v < 64 || (v & ~63ULL) - 1 < wfloor)
                return -1;
            v = (v & ~63ULL) - 1;
        }
        if (v < wfloor)
            return -1;
        c = (v + 1) << 6;
    }
    return -1;
}

/* The next stretch [*lo, *hi) of [from, end) inside one marked chunk; 0 when
 * there is none.  end must not exceed npages.  The walks over a range are
 *     for (x = first; next_populated_span(r, x, end, &lo, &hi); x = hi)
 * and look at the entries of [lo, hi) only. */
static int next_populated_span(const struct cdm_region *r, uint64_t from, uint64_t end,
                               uint64_t *lo, uint64_t *hi)
{
    if (from >= end)
        return 0;
    uint64_t cend = (end + CHUNK - 1) >> CHUNK_SHIFT;
    uint64_t c = next_populated_chunk(r, from >> CHUNK_SHIFT, cend);
    if (c == cend)
        return 0;
    uint64_t base = chunk_base(c);
    *lo = base > from ? base : from;
    *hi = base + CHUNK < end ? base + CHUNK : end;
    return 1;
}

/* The last stretch [*lo, *hi) of [floor, to) inside one marked chunk; 0 when
 * there is none.  to must not exceed npages. */
static int prev_populated_span(const struct cdm_region *r, uint64_t floor, uint64_t to,
                               uint64_t *lo, uint64_t *hi)
{
    if (floor >= to)
        return 0;
    int64_t c = prev_populated_chunk(r, floor >> CHUNK_SHIFT, (to + CHUNK - 1) >> CHUNK_SHIFT);
    if (c < 0)
        return 0;
    uint64_t base = chunk_base((uint64_t)c);
    *lo = base > floor ? base : floor;
    *hi = base + CHUNK < to ? base + CHUNK : to;
    return 1;
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

/* Drops page i: frees its frame, forgets poison and pin.  Caller holds m->lock. */
static void page_release(struct cdm_machine *m, struct cdm_region *r, uint64_t i)
{
    uint64_t pte = r->pte[i];
    if (pte & CDM_PTE_PINNED)
        r->nr_pinned--;
    if (pte & CDM_PTE_POISONED)
        r->nr_poisoned--;
    pte_set(m, r, i, 0);
    if (pte & CDM_PTE_PRESENT)
        frame_free(&m->pools[pte_pool(pte)], pte_pfn(pte) - m->pools[pte_pool(pte)].base_pfn);
}

/* -------------------------------------------------------------- regions */

struct cdm_region *cdm_region_new(struct cdm_machine *m, uint32_t id)
{
    (void)m;
    struct cdm_region *r = calloc(1, sizeof(*r));
    if (r)
        r->id = id;
    return r;
}

/* Grows a sparse mapping of old bytes (NULL: none yet) to new bytes, moving
 * it if need be; NULL, with the old one untouched, if the host refuses. */
static void *sparse_grow(void *old, uint64_t old_bytes, uint64_t new_bytes)
{
    if (!old)
        return sparse_map(new_bytes);
    if (new_bytes == old_bytes)
        return old;
    void *p = mremap(old, old_bytes, new_bytes, MREMAP_MAYMOVE);
    return p == MAP_FAILED ? NULL : p;
}

/* Reserves cap entries: the page table and its index grow together, all or
 * none, so that their sizes can always be told from r->cap.  Caller holds
 * m->lock. */
static int region_reserve(struct cdm_region *r, uint64_t cap)
{
    void **map[3] = {(void **)&r->chunks, (void **)&r->summary, (void **)&r->pte};
    uint64_t old[3] = {chunks_bytes(r->cap), summary_bytes(r->cap), pte_bytes(r->cap)};
    uint64_t new[3] = {chunks_bytes(cap), summary_bytes(cap), pte_bytes(cap)};
    for (int k = 0; k < 3; k++) {
        void *p = sparse_grow(*map[k], old[k], new[k]);
        if (p) {
            *map[k] = p;
            continue;
        }
        /* Back to the old sizes.  Shrinking in place does not fail short of
         * the host's limit on mappings, and then only leaks address space. */
        while (k-- > 0) {
            if (!r->cap) {
                munmap(*map[k], new[k]);
                *map[k] = NULL;
            } else if (new[k] != old[k]) {
                mremap(*map[k], new[k], old[k], 0);
            }
        }
        return -ENOMEM;
    }
    r->cap = cap;
    return 0;
}

int cdm_region_resize(struct cdm_machine *m, struct cdm_region *r, uint64_t npages)
{
    pthread_mutex_lock(&m->lock);
    if (npages > r->cap) {
        /* Reserve generously: entries cost host memory only once written. */
        uint64_t cap = r->cap ? r->cap : 1024;
        while (cap < npages)
            cap *= 2;
        if (region_reserve(r, cap) < 0) {
            drop_flush();
            pthread_mutex_unlock(&m->lock);
            return -ENOMEM;
        }
    }
    /* Only entries that hold something: writing every entry of a huge sparse
     * table would make all of it resident.  Last page first, so that the free
     * stack hands the frames out again in address order (see frame_alloc). */
    uint64_t lo, hi;
    for (uint64_t to = r->npages; prev_populated_span(r, npages, to, &lo, &hi); to = lo) {
        for (uint64_t i = hi; i-- > lo;)
            if (r->pte[i])
                page_release(m, r, i);
        if (chunk_base(lo >> CHUNK_SHIFT) >= npages)
            chunk_clear(r, lo >> CHUNK_SHIFT);
    }
    uint64_t old_npages = r->npages;
    r->npages = npages;
    /* The chunk the new end cuts: its mark may only hold for pages now gone. */
    if (npages < old_npages && npages % CHUNK)
        chunk_settle(r, npages >> CHUNK_SHIFT);
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return 0;
}

void cdm_region_free(struct cdm_machine *m, struct cdm_region *r)
{
    cdm_region_resize(m, r, 0);
    if (r->pte) {
        munmap(r->pte, pte_bytes(r->cap));
        munmap(r->chunks, chunks_bytes(r->cap));
        munmap(r->summary, summary_bytes(r->cap));
    }
    free(r);
}

void cdm_region_ptes(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                     uint64_t n, uint64_t *out)
{
    memset(out, 0, n * sizeof(*out));
    uint64_t lo, hi;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi)
        memcpy(out + (lo - first), r->pte + lo, (hi - lo) * sizeof(*out));
    drop_flush();
    pthread_mutex_unlock(&m->lock);
}

/* Counts the NUMA events the kernel's zone_statistics() (and, for interleave,
 * alloc_pages_mpol()) counts for page idx placed in pool.  Caller holds m->lock. */
static void numa_account(struct cdm_machine *m, uint64_t idx, int pool,
                         const struct cdm_plan *plan)
{
    int intended = plan->table[idx % plan->ntable];
    struct cdm_pool *p = &m->pools[pool];
    if (pool == intended) {
        p->counters[CDM_NUMA_HIT]++;
        if (plan->interleave)
            p->counters[CDM_INTERLEAVE_HIT]++;
    } else {
        p->counters[CDM_NUMA_MISS]++;
        m->pools[intended].counters[CDM_NUMA_FOREIGN]++;
    }
    p->counters[pool == plan->local ? CDM_LOCAL_NODE : CDM_OTHER_NODE]++;
}

/* Allocates a frame for page idx of r by plan.  Returns the new PTE or 0.  The
 * NUMA events are counted by numa_account() once the call commits.  Caller
 * holds m->lock. */
static uint64_t plan_alloc(struct cdm_machine *m, struct cdm_region *r, uint64_t idx,
                           const struct cdm_plan *plan)
{
    int intended = plan->table[idx % plan->ntable];
    const int32_t *row = plan->fallback + (size_t)intended * CDM_MAX_POOLS;
    for (int k = 0; k < CDM_MAX_POOLS && row[k] >= 0; k++) {
        int pool = row[k];
        struct cdm_pool *p = &m->pools[pool];
        int64_t f = frame_alloc(p, 1);
        if (f < 0)
            continue;
        p->rmap[f] = ((uint64_t)(r->id + 1) << 40) | idx;
        return make_pte(m, pool, p->base_pfn + (uint64_t)f);
    }
    return 0;
}

/* First touch of the absent pages of [first, end) by plan, all or nothing.
 * New entries carry PTE_NEW until the caller commits them (and counts their
 * NUMA events with numa_account()).  Returns 0, or -ENOSPC with res->page the
 * page that found no frame: then every frame this call took is given back,
 * newest first, as if never taken (no alloc/free/NUMA events).  Poisoned
 * pages are left alone.  Caller holds m->lock. */
static int alloc_absent(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                        uint64_t end, const struct cdm_plan *plan, struct cdm_rw_result *res)
{
    for (uint64_t i = first; i < end; i++) {
        if (r->pte[i] & (CDM_PTE_PRESENT | CDM_PTE_POISONED))
            continue;
        uint64_t pte = plan && plan->ntable ? plan_alloc(m, r, i, plan) : 0;
        if (!pte) {
            res->page = i;
            for (uint64_t j = i; j-- > first;) {
                uint64_t new = r->pte[j];
                if (!(new & PTE_NEW))
                    continue;
                struct cdm_pool *p = &m->pools[pte_pool(new)];
                pte_set(m, r, j, 0);
                frame_unalloc(p, pte_pfn(new) - p->base_pfn);
            }
            res->allocated = 0;
            return -ENOSPC;
        }
        pte_set(m, r, i, pte | PTE_NEW);
        res->allocated++;
    }
    return 0;
}

int cdm_region_rw(struct cdm_machine *m, struct cdm_region *r, uint64_t off, uint64_t len,
                  uint8_t *buf, int write, int mark_cpu, const struct cdm_plan *plan,
                  struct cdm_rw_result *res)
{
    res->allocated = 0;
    res->page = 0;
    if (len == 0)
        return 0;
    uint64_t first = off >> CDM_PAGE_SHIFT;
    uint64_t last = (off + len - 1) >> CDM_PAGE_SHIFT;
    int ret = 0;

    pthread_mutex_lock(&m->lock);
    if (last >= r->npages) {
        ret = -EINVAL;
        res->page = last;
        goto out;
    }
    /* Check the whole range first: the call changes nothing unless it can all be done. */
    for (uint64_t i = first; i <= last; i++) {
        uint64_t pte = r->pte[i];
        if (pte & CDM_PTE_POISONED)
            ret = -EIO;
        else if (pte & CDM_PTE_LOCKED)
            ret = -EAGAIN;
        else if (pte & CDM_PTE_PRIVATE)
            ret = -EREMOTE;
        else
            continue;
        res->page = i;
        goto out;
    }
    ret = alloc_absent(m, r, first, last + 1, plan, res);
    if (ret)
        goto out;
    for (uint64_t i = first; i <= last; i++) {
        uint64_t pte = r->pte[i];
        uint64_t pstart = i << CDM_PAGE_SHIFT;
        uint64_t from = off > pstart ? off - pstart : 0;
        uint64_t to = off + len < pstart + PAGE ? off + len - pstart : PAGE;
        uint8_t *b = buf + (pstart + from - off);
        uint8_t *f = frame_addr(m, pte);
        if (write) {
            memcpy(f + from, b, to - from);
            pte |= CDM_PTE_DIRTY;
        } else {
            memcpy(b, f + from, to - from);
            m->pools[pte_pool(pte)].counters[CDM_PGFAULT]++;
        }
        /* A WRITE of a page being migrated is the write-back its invalidation
         * caused: the kernel drops the page after it, so it is not mapped. */
        if (mark_cpu && !(write && (pte & CDM_PTE_MIGRATING)))
            pte |= CDM_PTE_CPU;
        if (pte & PTE_NEW)
            numa_account(m, i, pte_pool(pte), plan);
        pte &= ~PTE_NEW;
        if (pte != r->pte[i])
            pte_set(m, r, i, pte);
    }
out:
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return ret;
}

void cdm_region_uncache(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n)
{
    uint64_t lo, hi;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            seen |= r->pte[i];
            if (r->pte[i] & CDM_PTE_CPU)
                pte_set(m, r, i, r->pte[i] & ~CDM_PTE_CPU);
        }
        span_settle(r, lo, hi, seen);
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
}

/* ------------------------------------------------------------ migration */

int64_t cdm_migrate_collect(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                            uint64_t n, int target, int flags, uint64_t from_pools,
                            uint64_t *src, int32_t *status)
{
    int64_t collected = 0;
    int alloc_absent = flags & CDM_COLLECT_ALLOC_ABSENT;
    pthread_mutex_lock(&m->lock);
    for (uint64_t k = 0; k < n; k++) {
        uint64_t i = first + k;
        uint64_t pte = i < r->npages ? r->pte[i] : 0;
        src[k] = pte;
        if (i >= r->npages)
            status[k] = -EINVAL;
        else if (pte & CDM_PTE_POISONED)
            status[k] = -EIO;
        else if (pte & (CDM_PTE_PINNED | CDM_PTE_LOCKED))
            status[k] = -EBUSY;
        else if ((pte & CDM_PTE_MIGRATING)
                 && !((flags & CDM_COLLECT_TAKEOVER) && (pte & CDM_PTE_PRESENT) && !(pte & CDM_PTE_CPU)))
            status[k] = -EBUSY;
        else if (!(pte & CDM_PTE_PRESENT))
            status[k] = alloc_absent ? CDM_MIG_ALLOC : -ENOENT;
        else if ((pte_pool(pte) == target && !frame_leaving(m, pte))
                 || (from_pools && !(from_pools & (1ULL << pte_pool(pte)))))
            status[k] = CDM_MIG_THERE;
        else
            status[k] = CDM_MIG_MOVE;
        if (status[k] == CDM_MIG_MOVE) {
            pte_set(m, r, i, (pte | CDM_PTE_MIGRATING) & ~CDM_PTE_CPU);
            collected++;
        } else if (status[k] == CDM_MIG_ALLOC) {
            /* A placeholder so that a first touch during the migration waits. */
            pte_store(r, i, CDM_PTE_MIGRATING);
            collected++;
        }
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return collected;
}

int64_t cdm_migrate_lock(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                         uint64_t n, int32_t *status)
{
    return cdm_migrate_lock_src(m, r, first, n, NULL, status);
}

int64_t cdm_migrate_lock_src(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                             uint64_t n, const uint64_t *src, int32_t *status)
{
    int64_t locked = 0;
    pthread_mutex_lock(&m->lock);
    for (uint64_t k = 0; k < n; k++) {
        if (status[k] != CDM_MIG_MOVE && status[k] != CDM_MIG_ALLOC)
            continue;
        uint64_t i = first + k;
        if (i >= r->npages
            || (status[k] == CDM_MIG_MOVE && !(r->pte[i] & CDM_PTE_MIGRATING))
            || (status[k] == CDM_MIG_MOVE && src
                && (r->pte[i] & (CDM_PTE_PFN_MASK | CDM_PTE_POOL_MASK))
                   != (src[k] & (CDM_PTE_PFN_MASK | CDM_PTE_POOL_MASK)))) {
            /* Truncated since collect (and maybe grown again), or taken over
             * by a CPU fault-back (and maybe collected again by another
             * migration): the page we collected is not ours any more. */
            status[k] = -ENOENT;
            continue;
        }
        uint64_t pte = r->pte[i];
        if (pte & CDM_PTE_CPU) {
            /* The CPU faulted the page in again while we invalidated: it is in
             * use, skip it as migrate_vma skips a page it cannot unmap. */
            pte_set(m, r, i, pte & ~CDM_PTE_MIGRATING);
            status[k] = -EBUSY;
            continue;
        }
        if (status[k] == CDM_MIG_ALLOC && (pte & CDM_PTE_PRESENT)) {
            /* First-touched meanwhile by a write: no longer absent. */
            pte_set(m, r, i, pte & ~CDM_PTE_MIGRATING);
            status[k] = -EBUSY;
            continue;
        }
        pte_store(r, i, (pte & ~CDM_PTE_MIGRATING) | CDM_PTE_LOCKED);
        locked++;
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return locked;
}

int64_t cdm_migrate_alloc(struct cdm_machine *m, int target, uint64_t n,
                          int32_t *status, uint64_t *dst)
{
    struct cdm_pool *p = &m->pools[target];
    int64_t got = 0;
    pthread_mutex_lock(&m->lock);
    for (uint64_t k = 0; k < n; k++) {
        dst[k] = 0;
        if (status[k] != CDM_MIG_MOVE && status[k] != CDM_MIG_ALLOC)
            continue;
        int64_t f = frame_alloc(p, status[k] == CDM_MIG_ALLOC);
        if (f < 0) {
            status[k] = -ENOMEM;
            continue;
        }
        dst[k] = p->base_pfn + (uint64_t)f;
        got++;
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return got;
}

void cdm_copy_frames(struct cdm_machine *m, const uint64_t *src, const uint64_t *dst, uint64_t n)
{
    for (uint64_t k = 0; k < n; k++) {
        if (!src[k] || !dst[k])
            continue;
        uint8_t *s = cdm_pfn_addr(m, src[k]);
        uint8_t *d = cdm_pfn_addr(m, dst[k]);
        if (s && d)
            memcpy(d, s, PAGE);
    }
}

/* Copies whole frames with non-temporal stores: like a DMA engine, the copy
 * does not pull its target into the CPU's caches (or read it first), which
 * makes 2 MiB batches about 20% faster than memcpy here.  Frames are page
 * aligned. */
static void copy_frames(uint8_t *dst, const uint8_t *src, uint64_t bytes)
{
#ifdef __SSE2__
    __m128i *d = (__m128i *)dst;
    const __m128i *s = (const __m128i *)src;
    for (uint64_t k = 0; k < bytes / 16; k += 4) {
        __m128i a = _mm_load_si128(s + k), b = _mm_load_si128(s + k + 1);
        __m128i c = _mm_load_si128(s + k + 2), e = _mm_load_si128(s + k + 3);
        _mm_stream_si128(d + k, a);
        _mm_stream_si128(d + k + 1, b);
        _mm_stream_si128(d + k + 2, c);
        _mm_stream_si128(d + k + 3, e);
    }
    _mm_sfence();
#else
    memcpy(dst, src, bytes);
#endif
}

void cdm_migrate_copy(struct cdm_machine *m, uint64_t n, const int32_t *status,
                      const uint64_t *src, const uint64_t *dst)
{
    /* Runs without m->lock: the pages are LOCKED, nobody else touches these
     * frames.  Runs of consecutive frames are copied as one memcpy. */
    uint64_t k = 0;
    while (k < n) {
        if (status[k] != CDM_MIG_MOVE) {
            k++;
            continue;
        }
        uint64_t run = 1;
        while (k + run < n && status[k + run] == CDM_MIG_MOVE
               && pte_pfn(src[k + run]) == pte_pfn(src[k]) + run
               && pte_pool(src[k + run]) == pte_pool(src[k])
               && dst[k + run] == dst[k] + run)
            run++;
        copy_frames(cdm_pfn_addr(m, dst[k]), frame_addr(m, src[k]), run * PAGE);
        k += run;
    }
}

int64_t cdm_migrate_finalize(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                             uint64_t n, const uint64_t *dst, int32_t *status)
{
    int64_t moved = 0;
    pthread_mutex_lock(&m->lock);
    /* Last page first: the source frames go on the free stack so that the
     * next batch gets them back in address order, where its copy is one
     * memcpy per run of frames rather than one per page. */
    for (uint64_t k = n; k-- > 0;) {
        uint64_t i = first + k;
        int32_t st = status[k];
        if (st != CDM_MIG_MOVE && st != CDM_MIG_ALLOC) {
            /* Locked by cdm_migrate_lock() but given no frame (-ENOMEM): just
             * unlock.  Any other skipped page is not ours to unlock: lock has
             * already released the ones it skipped, and collect's -EBUSY ones
             * may be held by another migration. */
            if (st == -ENOMEM && i < r->npages && (r->pte[i] & CDM_PTE_LOCKED)) {
                uint64_t pte = r->pte[i] & ~(CDM_PTE_LOCKED | CDM_PTE_MIGRATING);
                if (pte & CDM_PTE_PRESENT)
                    pte_set(m, r, i, pte);
                else
                    r->pte[i] = 0;
            }
            continue;
        }
        uint64_t old = i < r->npages ? r->pte[i] : 0;
        int tpool = cdm_pfn_pool(m, dst[k]);
        struct cdm_pool *tp = &m->pools[tpool];
        if (!(old & CDM_PTE_LOCKED)) {
            /* Truncated during the copy: its source frame was freed with it;
             * give the target frame back. */
            frame_free(tp, dst[k] - tp->base_pfn);
            status[k] = -ENOENT;
            continue;
        }
        /* The new entry keeps the page's own flags (pinned, dirty), not the
         * source frame's pool or the lock. */
        uint64_t keep = old & (CDM_PTE_PINNED | CDM_PTE_DIRTY);
        tp->rmap[dst[k] - tp->base_pfn] = ((uint64_t)(r->id + 1) << 40) | i;
        if (st == CDM_MIG_MOVE) {
            struct cdm_pool *sp = &m->pools[pte_pool(old)];
            pte_set(m, r, i, make_pte(m, tpool, dst[k]) | keep);
            frame_free(sp, pte_pfn(old) - sp->base_pfn);
            sp->counters[CDM_PGMIGRATE_SUCCESS]++;
        } else {
            r->pte[i] = 0;
            pte_set(m, r, i, make_pte(m, tpool, dst[k]));
        }
        status[k] = CDM_MIG_DONE;
        moved++;
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return moved;
}

/* ------------------------------------------------------------ FUSE notify */

int cdm_fuse_inval(int fd, uint64_t ino, int64_t off, int64_t len)
{
    /* struct fuse_out_header { u32 len; s32 error; u64 unique; } with
     * error = FUSE_NOTIFY_INVAL_INODE (2), then
     * struct fuse_notify_inval_inode_out { u64 ino; s64 off; s64 len; }. */
    struct {
        uint32_t len;
        int32_t error;
        uint64_t unique;
        uint64_t ino;
        int64_t off;
        int64_t len2;
    } msg = {40, 2, 0, ino, off, len};
    /* Never write the message into anything but /dev/fuse (misc 10:229): a
     * stale or wrong descriptor would take it as data and report success. */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISCHR(st.st_mode) || major(st.st_rdev) != 10 || minor(st.st_rdev) != 229)
        return -EINVAL;
    ssize_t n = write(fd, &msg, sizeof(msg));
    if (n < 0)
        return -errno;
    return n == (ssize_t)sizeof(msg) ? 0 : -EIO;
}

uint64_t cdm_migrate_holes(const int32_t *status, uint64_t n, uint64_t *idx, int32_t *err)
{
    uint64_t h = 0;
    for (uint64_t k = 0; k < n; k++)
        if (status[k] < 0) {
            idx[h] = k;
            err[h++] = status[k];
        }
    return h;
}

uint64_t cdm_migrate_hole_runs(const int32_t *status, uint64_t n, uint64_t *run_first,
                               uint64_t *run_last, int32_t *err)
{
    uint64_t h = 0;
    for (uint64_t k = 0; k < n; k++) {
        if (status[k] >= 0)
            continue;
        if (h && run_last[h - 1] + 1 == k && err[h - 1] == status[k]) {
            run_last[h - 1] = k;
        } else {
            run_first[h] = run_last[h] = k;
            err[h++] = status[k];
        }
    }
    return h;
}

uint64_t cdm_migrate_count(const uint64_t *src, const int32_t *status, uint64_t n, uint64_t flag)
{
    uint64_t c = 0;
    for (uint64_t k = 0; k < n; k++)
        if ((status[k] == CDM_MIG_MOVE || status[k] == CDM_MIG_ALLOC) && (src[k] & flag))
            c++;
    return c;
}

/* ------------------------------------------------------------ device ops */

/* libdeflate's CRC-32 (PCLMULQDQ folding where the CPU has it, picked at run
 * time); the result is zlib's crc32, continuing from crc as zlib does. */
uint32_t cdm_crc32(uint32_t crc, const uint8_t *buf, uint64_t len)
{
    return libdeflate_crc32(crc, buf, (size_t)len);
}

/*
 * Pages are read in address order whatever their order in the region: frames
 * handed out again from the free stack come back descending or scattered,
 * and reading memory a page at a time out of order is up to 40% slower than
 * one forward sweep.  The CRC register is linear over GF(2): with T(s, M) the
 * register after message M from state s (zlib's crc32 is ~T(~crc, M)),
 * T(s, P) = A(s) ^ T(0, P) for a page P, A advancing a state over a page of
 * zero bytes.  So each page's T(0, P) is taken in address order, then they
 * are chained in page order, four table lookups a page.
 */
#define CRC_CHUNK_SHIFT 16
#define CRC_CHUNK (1U << CRC_CHUNK_SHIFT)  /* pages sorted at once (256 MiB of data) */
static uint32_t crc_shift[4][256];         /* A, a byte of the state at a time */

static void crc_shift_init(void)
{
    static const uint8_t zero[PAGE];
    uint32_t basis[32];
    for (int i = 0; i < 32; i++)
        basis[i] = ~libdeflate_crc32(~(1U << i), zero, PAGE);
    for (int b = 0; b < 4; b++)
        for (int v = 0; v < 256; v++) {
            uint32_t x = 0;
            for (int i = 0; i < 8; i++)
                if (v & (1 << i))
                    x ^= basis[8 * b + i];
            crc_shift[b][v] = x;
        }
}

static inline uint32_t crc_advance_page(uint32_t s)
{
    return crc_shift[0][s & 0xff] ^ crc_shift[1][(s >> 8) & 0xff]
        ^ crc_shift[2][(s >> 16) & 0xff] ^ crc_shift[3][s >> 24];
}

/* Sorts n keys (LSD radix, a byte at a time from bit lo up, skipping bytes
 * that are the same in every key); tmp has room for n. */
static void radix_sort(uint64_t *key, uint64_t *tmp, uint64_t n, int lo)
{
    uint64_t all_or = 0, all_and = ~0ULL;
    for (uint64_t k = 0; k < n; k++) {
        all_or |= key[k];
        all_and &= key[k];
    }
    for (int sh = lo; sh < 64; sh += 8) {
        if (!(((all_or ^ all_and) >> sh) & 0xff))
            continue;
        uint64_t count[257] = {0};
        for (uint64_t k = 0; k < n; k++)
            count[((key[k] >> sh) & 0xff) + 1]++;
        for (int d = 0; d < 256; d++)
            count[d + 1] += count[d];
        for (uint64_t k = 0; k < n; k++)
            tmp[count[(key[k] >> sh) & 0xff]++] = key[k];
        memcpy(key, tmp, n * sizeof(*key));
    }
}

/* Up to CRC_CHUNK pages: in order if ascending, else sorted (0, or -ENOMEM). */
static int crc_pages_chunk(uint32_t *crc, uint8_t *const *pages, uint64_t n)
{
    uint64_t k = 1;
    while (k < n && (uintptr_t)pages[k] > (uintptr_t)pages[k - 1])
        k++;
    if (k >= n) {
        for (k = 0; k < n; k++)
            *crc = libdeflate_crc32(*crc, pages[k], PAGE);
        return 0;
    }
    /* key: the page's address above bit CRC_CHUNK_SHIFT, its index below
     * (user addresses are page aligned and below 2^48). */
    uint64_t *key = malloc(n * sizeof(*key));
    uint64_t *tmp = malloc(n * sizeof(*tmp));
    uint32_t *part = malloc(n * sizeof(*part));
    if (!key || !tmp || !part) {
        free(key);
        free(tmp);
        free(part);
        return -ENOMEM;
    }
    for (k = 0; k < n; k++)
        key[k] = ((uint64_t)(uintptr_t)pages[k] >> CDM_PAGE_SHIFT << CRC_CHUNK_SHIFT) | k;
    radix_sort(key, tmp, n, CRC_CHUNK_SHIFT);
    for (k = 0; k < n; k++) {
        const uint8_t *f = (const uint8_t *)(uintptr_t)(key[k] >> CRC_CHUNK_SHIFT << CDM_PAGE_SHIFT);
        part[key[k] & (CRC_CHUNK - 1)] = ~libdeflate_crc32(~0U, f, PAGE);  /* T(0, P) */
    }
    uint32_t s = ~*crc;
    for (k = 0; k < n; k++)
        s = crc_advance_page(s) ^ part[k];
    *crc = ~s;
    free(key);
    free(tmp);
    free(part);
    return 0;
}

uint32_t cdm_crc32_pages(uint32_t crc, uint8_t *const *pages, uint64_t n)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, crc_shift_init);
    for (uint64_t o = 0; o < n; o += CRC_CHUNK) {
        uint64_t c = n - o < CRC_CHUNK ? n - o : CRC_CHUNK;
        if (crc_pages_chunk(&crc, pages + o, c) < 0)
            for (uint64_t k = o; k < o + c; k++)    /* no memory: in page order */
                crc = libdeflate_crc32(crc, pages[k], PAGE);
    }
    return crc;
}

int cdm_device_op(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                  int op, uint64_t arg, uint64_t own_pools, uint64_t private_ok,
                  struct cdm_op_result *res)
{
    uint32_t crc = res->crc;    /* a read cut into calls goes on from the last */
    memset(res, 0, sizeof(*res));
    res->crc = crc;
    int ret = 0;
    pthread_mutex_lock(&m->lock);
    for (uint64_t i = first; i < first + n; i++) {
        uint64_t pte = i < r->npages ? r->pte[i] : CDM_PTE_POISONED;
        if (pte & CDM_PTE_POISONED)
            ret = -EIO;
        else if (pte & CDM_PTE_LOCKED)
            ret = -EAGAIN;
        else if (!(pte & CDM_PTE_PRESENT))
            ret = -ENOENT;
        else if ((pte & CDM_PTE_PRIVATE) && !(private_ok & (1ULL << pte_pool(pte))))
            ret = -EREMOTE;
        else
            continue;
        res->page = i;
        goto out;
    }
    /* A read collects the frames of up to CRC_CHUNK pages at a time, then
     * checksums them in address order (in page order if there is no memory). */
    uint64_t npages = 0, room = n < CRC_CHUNK ? n : CRC_CHUNK;
    uint8_t **pages = op == CDM_OP_READ ? malloc(room * sizeof(*pages)) : NULL;
    for (uint64_t i = first; i < first + n; i++) {
        uint64_t pte = r->pte[i];
        uint8_t *f = frame_addr(m, pte);
        if (own_pools & (1ULL << pte_pool(pte)))
            res->local_bytes += PAGE;
        else
            res->remote_bytes += PAGE;
        if (pte & CDM_PTE_CPU)
            res->cpu_pages++;
        switch (op) {
        case CDM_OP_READ:
            if (pages) {
                pages[npages++] = f;
                if (npages == room) {
                    res->crc = cdm_crc32_pages(res->crc, pages, npages);
                    npages = 0;
                }
            } else
                res->crc = cdm_crc32(res->crc, f, PAGE);
            break;
        case CDM_OP_WRITE:
            memset(f, (int)(arg & 0xff), PAGE);
            break;
        case CDM_OP_ADD:
            for (int w = 0; w < PAGE; w += 8) {
                uint64_t v;
                memcpy(&v, f + w, 8);
                v += arg;
                memcpy(f + w, &v, 8);
            }
            break;
        default:
            break;
        }
        if ((op == CDM_OP_WRITE || op == CDM_OP_ADD) && !(pte & CDM_PTE_DIRTY))
            pte_set(m, r, i, pte | CDM_PTE_DIRTY);
    }
    if (pages) {
        res->crc = cdm_crc32_pages(res->crc, pages, npages);
        free(pages);
    }
out:
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return ret;
}

void cdm_migrate_abort(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                       uint64_t n, const uint64_t *dst, int32_t *status)
{
    pthread_mutex_lock(&m->lock);
    for (uint64_t k = 0; k < n; k++) {
        if (status[k] != CDM_MIG_MOVE && status[k] != CDM_MIG_ALLOC)
            continue;
        uint64_t i = first + k;
        if (dst && dst[k]) {
            int tpool = cdm_pfn_pool(m, dst[k]);
            if (tpool >= 0)
                frame_free(&m->pools[tpool], dst[k] - m->pools[tpool].base_pfn);
        }
        if (i < r->npages && (r->pte[i] & (CDM_PTE_LOCKED | CDM_PTE_MIGRATING))) {
            uint64_t pte = r->pte[i] & ~(CDM_PTE_LOCKED | CDM_PTE_MIGRATING);
            if (pte & CDM_PTE_PRESENT)
                pte_set(m, r, i, pte);
            else
                r->pte[i] = 0;
        }
        status[k] = -EINTR;
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
}

int cdm_region_populate(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                        uint64_t n, const struct cdm_plan *plan, struct cdm_rw_result *res)
{
    res->allocated = 0;
    res->page = 0;
    int ret = 0;
    pthread_mutex_lock(&m->lock);
    if (first + n > r->npages) {
        res->page = first + n - 1;
        ret = -EINVAL;
        goto out;
    }
    for (uint64_t i = first; i < first + n; i++) {
        if (r->pte[i] & (CDM_PTE_LOCKED | CDM_PTE_MIGRATING)) {
            res->page = i;
            ret = -EAGAIN;
            goto out;
        }
    }
    ret = alloc_absent(m, r, first, first + n, plan, res);
    if (ret)
        goto out;
    for (uint64_t i = first; i < first + n; i++) {
        uint64_t pte = r->pte[i];
        if (pte & PTE_NEW) {
            numa_account(m, i, pte_pool(pte), plan);
            pte_store(r, i, pte & ~PTE_NEW);
        }
    }
out:
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return ret;
}

uint64_t cdm_region_count(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                          uint64_t n, uint64_t flag)
{
    uint64_t c = 0, lo, hi;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            seen |= r->pte[i];
            c += (r->pte[i] & flag) != 0;
        }
        span_settle(r, lo, hi, seen);
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return c;
}

uint64_t cdm_region_next_present(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                 uint64_t end)
{
    uint64_t found = end, lo, hi;
    pthread_mutex_lock(&m->lock);
    uint64_t stop = end < r->npages ? end : r->npages;
    for (uint64_t x = first; next_populated_span(r, x, stop, &lo, &hi); x = hi) {
        uint64_t i = lo;
        while (i < hi && !r->pte[i])
            i++;
        if (i < hi) {
            found = i;
            break;
        }
        span_settle(r, lo, hi, 0);
    }
    pthread_mutex_unlock(&m->lock);
    return found;
}

uint64_t cdm_region_flag_runs(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                              uint64_t n, uint64_t flag, uint64_t *run_first, uint64_t *run_len,
                              uint64_t max, uint64_t *next)
{
    uint64_t runs = 0, lo, hi;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    *next = end < r->npages ? end : r->npages;
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            uint64_t pte = r->pte[i];
            seen |= pte;
            if (!(pte & flag))
                continue;
            /* Skipped chunks are all zero, so a run never spans one. */
            if (runs && run_first[runs - 1] + run_len[runs - 1] == i) {
                run_len[runs - 1]++;
            } else if (runs < max) {
                run_first[runs] = i;
                run_len[runs++] = 1;
            } else {
                *next = i;
                goto out;
            }
        }
        span_settle(r, lo, hi, seen);
    }
out:
    pthread_mutex_unlock(&m->lock);
    return runs;
}

uint64_t cdm_region_mirror_pool(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                uint64_t n, int pool, uint8_t *mirror, uint8_t value)
{
    uint64_t c = 0, lo, hi;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            uint64_t pte = r->pte[i];
            seen |= pte;
            if ((pte & CDM_PTE_PRESENT) && pte_pool(pte) == pool) {
                mirror[i] = value;
                c++;
            }
        }
        span_settle(r, lo, hi, seen);
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return c;
}

/* ---------------------------------------------------------- introspection */

void cdm_region_census(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                       uint64_t *present, uint64_t *dirty)
{
    uint64_t lo, hi;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            uint64_t pte = r->pte[i];
            seen |= pte;
            if (!(pte & CDM_PTE_PRESENT) || (pte & CDM_PTE_POISONED))
                continue;
            present[pte_pool(pte)]++;
            if (pte & CDM_PTE_DIRTY)
                dirty[pte_pool(pte)]++;
        }
        span_settle(r, lo, hi, seen);
    }
    pthread_mutex_unlock(&m->lock);
}

void cdm_region_pagemap(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                        uint64_t *out, int show_pfn)
{
    uint64_t pfn_mask = show_pfn ? CDM_PM_PFN_MASK : 0;
    /* Pages in chunks never populated (and beyond the end) read as never touched. */
    memset(out, 0, n * sizeof(*out));
    uint64_t lo, hi;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            uint64_t pte = r->pte[i];
            seen |= pte;
            if (!(pte & (CDM_PTE_PRESENT | CDM_PTE_POISONED)))
                continue;   /* never touched (a poisoned entry keeps its old PFN) */
            uint64_t e = (pte_pfn(pte) & pfn_mask) | CDM_PM_FILE;
            /* Device-private pages are swap-like entries to the CPU, as the
             * kernel's device-private entries; so are poisoned ones (hwpoison). */
            e |= (pte & (CDM_PTE_PRIVATE | CDM_PTE_POISONED)) ? CDM_PM_SWAP : CDM_PM_PRESENT;
            out[i - first] = e;
        }
        span_settle(r, lo, hi, seen);
    }
    pthread_mutex_unlock(&m->lock);
}

uint64_t cdm_region_misfits(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                            uint64_t n, const int32_t *table, uint32_t ntable,
                            uint64_t fit_pools, uint64_t skip_pools, uint64_t *run_first,
                            uint64_t *run_len, int32_t *run_pool, uint64_t max, uint64_t *nruns)
{
    uint64_t count = 0, runs = 0, lo, hi;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            uint64_t pte = r->pte[i];
            seen |= pte;
            if (!(pte & CDM_PTE_PRESENT) || (pte & CDM_PTE_POISONED))
                continue;
            int pool = pte_pool(pte);
            if (skip_pools & (1ULL << pool))
                continue;
            int32_t want = ntable ? table[i % ntable] : -1;
            if ((fit_pools & (1ULL << pool)) || pool == want)
                continue;
            count++;
            if (runs && run_first[runs - 1] + run_len[runs - 1] == i && run_pool[runs - 1] == want) {
                run_len[runs - 1]++;
            } else if (runs < max) {
                run_first[runs] = i;
                run_len[runs] = 1;
                run_pool[runs] = want;
                runs++;
            }
        }
        span_settle(r, lo, hi, seen);
    }
    pthread_mutex_unlock(&m->lock);
    *nruns = runs;
    return count;
}

/* -------------------------------------------------------------- lifecycle */

int cdm_pool_set_blocks(struct cdm_machine *m, int pool, uint64_t block_pages)
{
    if (pool < 0 || pool >= m->npools || block_pages == 0)
        return -EINVAL;
    struct cdm_pool *p = &m->pools[pool];
    if (p->block_pages || p->base_pfn % block_pages)
        return -EINVAL;
    uint64_t nblocks = (p->npages + block_pages - 1) / block_pages;
    uint8_t *b = calloc(nblocks, 1);
    if (!b)
        return -ENOMEM;
    pthread_mutex_lock(&m->lock);
    p->bflags = b;
    p->nblocks = nblocks;
    p->block_pages = block_pages;
    pthread_mutex_unlock(&m->lock);
    return 0;
}

int64_t cdm_block_isolate(struct cdm_machine *m, int pool, uint64_t block, int isolate)
{
    if (pool < 0 || pool >= m->npools)
        return -EINVAL;
    struct cdm_pool *p = &m->pools[pool];
    if (block >= p->nblocks)
        return -EINVAL;
    uint64_t lo = block * p->block_pages;
    uint64_t hi = lo + p->block_pages < p->npages ? lo + p->block_pages : p->npages;
    int64_t given = 0;
    pthread_mutex_lock(&m->lock);
    drop_flush();
    if (isolate && !(p->bflags[block] & CDM_BLOCK_ISOLATED)) {
        p->bflags[block] |= CDM_BLOCK_ISOLATED;
        stack_remove(p, lo, hi);
    } else if (!isolate && (p->bflags[block] & CDM_BLOCK_ISOLATED)) {
        p->bflags[block] &= ~CDM_BLOCK_ISOLATED;
        /* While isolated none of its frames was on the stack: the free ones
         * below next_fresh go back now, each once; the bump pointer will
         * reach the others. */
        uint64_t end = hi < p->next_fresh ? hi : p->next_fresh;
        for (uint64_t f = lo; f < end; f++)
            if (!(p->fflags[f] & (CDM_FRAME_USED | CDM_FRAME_RETIRED)) && stack_push(p, f) == 0)
                given++;
        for (uint64_t f = end > lo ? end : lo; f < hi; f++)
            if (!(p->fflags[f] & CDM_FRAME_RETIRED))
                given++;
    }
    pthread_mutex_unlock(&m->lock);
    return given;
}

void cdm_pool_isolate(struct cdm_machine *m, int pool, int isolate)
{
    pthread_mutex_lock(&m->lock);
    if (isolate)
        m->pools[pool].flags |= CDM_POOL_ISOLATED;
    else
        m->pools[pool].flags &= ~CDM_POOL_ISOLATED;
    pthread_mutex_unlock(&m->lock);
}

/* The frames of [pfn, pfn + n) that are in pool p: [*lo, *hi) frame indices. */
static int frame_range(struct cdm_machine *m, uint64_t pfn, uint64_t n, uint64_t *lo, uint64_t *hi)
{
    int pool = cdm_pfn_pool(m, pfn);
    if (pool < 0)
        return -1;
    struct cdm_pool *p = &m->pools[pool];
    *lo = pfn - p->base_pfn;
    *hi = *lo + n < p->npages ? *lo + n : p->npages;
    return pool;
}

void cdm_frames_census(struct cdm_machine *m, uint64_t pfn, uint64_t n, uint64_t *out)
{
    uint64_t lo, hi;
    out[0] = out[1] = 0;
    int pool = frame_range(m, pfn, n, &lo, &hi);
    if (pool < 0)
        return;
    struct cdm_pool *p = &m->pools[pool];
    pthread_mutex_lock(&m->lock);
    for (uint64_t f = lo; f < hi; f++) {
        uint8_t fl = p->fflags[f];
        if (fl & CDM_FRAME_USED)
            out[0]++;
        if ((fl & CDM_FRAME_RETIRED) && !(fl & CDM_FRAME_USED))
            out[1]++;
    }
    pthread_mutex_unlock(&m->lock);
}

uint64_t cdm_frames_owners(struct cdm_machine *m, uint64_t pfn, uint64_t n, uint32_t *region,
                           uint64_t *page, uint64_t max, uint64_t *next)
{
    uint64_t lo, hi, count = 0;
    *next = pfn + n;
    int pool = frame_range(m, pfn, n, &lo, &hi);
    if (pool < 0)
        return 0;
    struct cdm_pool *p = &m->pools[pool];
    pthread_mutex_lock(&m->lock);
    /* Frames at or above next_fresh were never used. */
    uint64_t end = hi < p->next_fresh ? hi : p->next_fresh;
    for (uint64_t f = lo; f < end; f++) {
        uint64_t owner = p->rmap[f];
        if (!owner)
            continue;
        if (count == max) {
            *next = p->base_pfn + f;
            break;
        }
        region[count] = (uint32_t)((owner >> 40) - 1);
        page[count] = owner & CDM_PTE_PFN_MASK;
        count++;
    }
    pthread_mutex_unlock(&m->lock);
    return count;
}

int cdm_frame_retire(struct cdm_machine *m, uint64_t pfn, int flags)
{
    uint64_t lo, hi;
    int pool = frame_range(m, pfn, 1, &lo, &hi);
    if (pool < 0)
        return -EINVAL;
    struct cdm_pool *p = &m->pools[pool];
    int ret;
    pthread_mutex_lock(&m->lock);
    drop_flush();
    uint8_t fl = p->fflags[lo];
    if (fl & CDM_FRAME_RETIRED) {
        ret = -EALREADY;
    } else if (fl & CDM_FRAME_USED) {
        /* frame_free() retires it when its page leaves. */
        p->fflags[lo] |= (uint8_t)(flags | CDM_FRAME_RETIRED);
        ret = 1;
    } else {
        if (lo < p->next_fresh && !block_isolated(p, lo))
            stack_remove(p, lo, lo + 1);
        p->fflags[lo] |= (uint8_t)(flags | CDM_FRAME_RETIRED);
        p->nr_retired++;
        drop_frame(p, lo);
        ret = 0;
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return ret;
}

uint64_t cdm_frames_unretire(struct cdm_machine *m, uint64_t pfn, uint64_t n)
{
    uint64_t lo, hi, count = 0;
    int pool = frame_range(m, pfn, n, &lo, &hi);
    if (pool < 0)
        return 0;
    struct cdm_pool *p = &m->pools[pool];
    pthread_mutex_lock(&m->lock);
    for (uint64_t f = lo; f < hi; f++) {
        uint8_t fl = p->fflags[f];
        if (!(fl & CDM_FRAME_RETIRED))
            continue;
        p->fflags[f] = fl & (uint8_t)~(CDM_FRAME_RETIRED | CDM_FRAME_POISONED);
        count++;
        if (fl & CDM_FRAME_USED)
            continue;       /* a pending retirement, called off */
        p->nr_retired--;
        if (f < p->next_fresh && !block_isolated(p, f))
            stack_push(p, f);
    }
    pthread_mutex_unlock(&m->lock);
    return count;
}

/* Page i of r loses its frame to a memory failure.  Caller holds m->lock. */
static void page_poison(struct cdm_machine *m, struct cdm_region *r, uint64_t i)
{
    uint64_t pte = r->pte[i];
    struct cdm_pool *p = &m->pools[pte_pool(pte)];
    uint64_t f = pte_pfn(pte) - p->base_pfn;
    if (pte & CDM_PTE_PINNED)
        r->nr_pinned--;
    pte_set(m, r, i, CDM_PTE_POISONED | (pte & (CDM_PTE_POOL_MASK | CDM_PTE_PFN_MASK)));
    r->nr_poisoned++;
    p->fflags[f] |= CDM_FRAME_RETIRED | CDM_FRAME_POISONED;
    frame_free(p, f);       /* drops the data; counted as retired */
}

int cdm_page_poison(struct cdm_machine *m, struct cdm_region *r, uint64_t page, uint64_t pfn)
{
    int ret = 0;
    pthread_mutex_lock(&m->lock);
    uint64_t pte = page < r->npages ? r->pte[page] : 0;
    if (!(pte & CDM_PTE_PRESENT) || (pte & CDM_PTE_POISONED) || pte_pfn(pte) != pfn)
        ret = -ENOENT;
    else if (pte & (CDM_PTE_LOCKED | CDM_PTE_MIGRATING))
        ret = -EAGAIN;
    else
        page_poison(m, r, page);
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return ret;
}

uint64_t cdm_region_poison_pool(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                uint64_t n, int pool, uint64_t *busy)
{
    uint64_t count = 0, lo, hi;
    *busy = 0;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;  /* poisoning leaves an entry non-zero */
        for (uint64_t i = lo; i < hi; i++) {
            uint64_t pte = r->pte[i];
            seen |= pte;
            if (!(pte & CDM_PTE_PRESENT) || (pte & CDM_PTE_POISONED) || pte_pool(pte) != pool)
                continue;
            if (pte & (CDM_PTE_LOCKED | CDM_PTE_MIGRATING)) {
                (*busy)++;
                continue;
            }
            page_poison(m, r, i);
            count++;
        }
        span_settle(r, lo, hi, seen);
    }
    drop_flush();
    pthread_mutex_unlock(&m->lock);
    return count;
}

int cdm_region_pin(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                   int pin, uint64_t deny_pools, struct cdm_rw_result *res)
{
    int ret = 0;
    uint64_t lo, hi;
    res->allocated = 0;
    res->page = 0;
    pthread_mutex_lock(&m->lock);
    uint64_t end = walk_end(r, first, n);
    if (pin) {
        if (first + n > r->npages) {
            res->page = r->npages;
            ret = -ENOENT;
            goto out;
        }
        for (uint64_t i = first; i < end; i++) {
            uint64_t pte = r->pte[i];
            if (pte & CDM_PTE_POISONED)
                ret = -EIO;
            else if (pte & (CDM_PTE_LOCKED | CDM_PTE_MIGRATING))
                ret = -EAGAIN;
            else if (!(pte & CDM_PTE_PRESENT))
                ret = -ENOENT;
            else if (deny_pools & (1ULL << pte_pool(pte)))
                ret = -EREMOTE;
            else
                continue;
            res->page = i;
            goto out;
        }
    }
    if (pin) {
        /* Every page of the range is present (checked above): no chunk to skip. */
        for (uint64_t i = first; i < end; i++) {
            uint64_t pte = r->pte[i];
            if (!(pte & CDM_PTE_PINNED)) {
                pte_set(m, r, i, pte | CDM_PTE_PINNED);
                r->nr_pinned++;
                res->allocated++;
            }
        }
        goto out;
    }
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            uint64_t pte = r->pte[i];
            seen |= pte;
            if (!(pte & CDM_PTE_PINNED))
                continue;
            if (pte & CDM_PTE_PRESENT)
                pte_set(m, r, i, pte & ~CDM_PTE_PINNED);
            else
                pte_store(r, i, pte & ~CDM_PTE_PINNED);
            r->nr_pinned--;
            res->allocated++;
        }
        span_settle(r, lo, hi, seen);
    }
out:
    pthread_mutex_unlock(&m->lock);
    return ret;
}

uint64_t cdm_migrate_runs(const uint64_t *src, const int32_t *status, uint64_t n, uint64_t flag,
                          uint64_t *start, uint64_t *len)
{
    uint64_t runs = 0;
    for (uint64_t k = 0; k < n;) {
        int hit = (status[k] == CDM_MIG_MOVE || status[k] == CDM_MIG_ALLOC) && (src[k] & flag);
        if (!hit) {
            k++;
            continue;
        }
        uint64_t s = k;
        while (k < n && (status[k] == CDM_MIG_MOVE || status[k] == CDM_MIG_ALLOC) && (src[k] & flag))
            k++;
        start[runs] = s;
        len[runs++] = k - s;
    }
    return runs;
}
