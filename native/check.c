/* check.c — cdm_machine_check(): the invariants of pools, frames, page tables
 * and their counters, verified from scratch under the machine's mutex (in
 * the spirit of the kernel's CONFIG_DEBUG_VM checks).  For tests and debug
 * runs: it reads every frame flag below each pool's bump pointer and every
 * page of the page tables the host has backed. */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

struct check {
    char *msg;
    uint64_t msglen;
    int failed;
};

__attribute__((format(printf, 2, 3)))
static int fail(struct check *c, const char *fmt, ...)
{
    if (c->failed++)
        return -EINVAL;     /* the first violation is the one reported */
    if (c->msg && c->msglen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->msg, c->msglen, fmt, ap);
        va_end(ap);
    }
    return -EINVAL;
}

static inline int bit_test(const uint64_t *b, uint64_t i) { return (b[i >> 6] >> (i & 63)) & 1; }
static inline void bit_set(uint64_t *b, uint64_t i) { b[i >> 6] |= 1ULL << (i & 63); }

/* Calls fn for each page of [addr, addr + bytes) the host has backed (mincore):
 * a page of a sparse mapping it never backed reads as zeros.  addr is page
 * aligned.  Stops at fn's first non-zero return and returns it. */
static int each_backed_page(void *addr, uint64_t bytes,
                            int (*fn)(void *arg, uint64_t page), void *arg)
{
    enum { BATCH = 1 << 16 };
    unsigned char *vec = malloc(BATCH);
    uint64_t pages = (bytes + PAGE - 1) / PAGE;
    int ret = 0;
    for (uint64_t o = 0; o < pages && !ret; o += BATCH) {
        uint64_t n = pages - o < BATCH ? pages - o : BATCH;
        int all = !vec || mincore((uint8_t *)addr + o * PAGE, n * PAGE, vec) < 0;
        for (uint64_t k = 0; k < n && !ret; k++)
            if (all || (vec[k] & 1))    /* cannot tell: look at the page */
                ret = fn(arg, o + k);
    }
    free(vec);
    return ret;
}

/* ------------------------------------------------------------------ frames */

struct pool_seen {
    uint64_t *on_stack;     /* a bit per frame below next_fresh */
    uint64_t *claimed;      /* a bit per frame below next_fresh: a present entry points at it */
    uint64_t mapped, dirty, pinned;
};

struct fresh_scan {
    struct check *c;
    int pool;
    struct cdm_pool *p;
    uint64_t from;          /* frame of the first byte of the scanned stretch */
    uint64_t retired;
};

/* Frames at or above next_fresh, a page of fflags at a time: never used. */
static int fresh_page(void *arg, uint64_t page)
{
    struct fresh_scan *s = arg;
    struct cdm_pool *p = s->p;
    uint64_t lo = s->from + page * PAGE, hi = lo + PAGE < p->npages ? lo + PAGE : p->npages;
    if (lo < p->next_fresh)
        lo = p->next_fresh;
    for (uint64_t f = lo; f < hi; f++) {
        uint8_t fl = p->fflags[f];
        if (fl & (CDM_FRAME_USED | CDM_FRAME_STALE))
            return fail(s->c, "pool %d frame %" PRIu64 " at or above next_fresh %" PRIu64
                        " has flags %#x", s->pool, f, p->next_fresh, fl);
        if ((fl & CDM_FRAME_POISONED) && !(fl & CDM_FRAME_RETIRED))
            return fail(s->c, "pool %d frame %" PRIu64 " is poisoned but not retired", s->pool, f);
        if (fl & CDM_FRAME_RETIRED)
            s->retired++;
    }
    return 0;
}

static int check_pool(struct check *c, struct cdm_machine *m, int i, struct pool_seen *seen)
{
    struct cdm_pool *p = &m->pools[i];
    if (p->next_fresh > p->npages)
        return fail(c, "pool %d next_fresh %" PRIu64 " beyond npages %" PRIu64, i,
                    p->next_fresh, p->npages);
    if (p->nfree_stack > p->free_cap || p->nresident > p->nfree_stack
        || p->nresident > CDM_RESIDENT_FREE_PAGES)
        return fail(c, "pool %d free stack sizes: %" PRIu64 " entries, cap %" PRIu64
                    ", %" PRIu64 " resident", i, p->nfree_stack, p->free_cap, p->nresident);
    if (p->block_pages
        && p->nblocks != p->npages / p->block_pages + (p->npages % p->block_pages != 0))
        return fail(c, "pool %d has %" PRIu64 " blocks of %" PRIu64 " frames for %" PRIu64
                    " frames", i, p->nblocks, p->block_pages, p->npages);
    uint64_t words = (p->next_fresh + 63) / 64;
    seen->on_stack = calloc(words ? words : 1, sizeof(uint64_t));
    seen->claimed = calloc(words ? words : 1, sizeof(uint64_t));
    if (!seen->on_stack || !seen->claimed)
        return fail(c, "pool %d: no memory for the check", i);

    /* The free stack: free frames below next_fresh, each once, none retired
     * or in an isolated block; only the resident window may hold stale ones. */
    for (uint64_t j = 0; j < p->nfree_stack; j++) {
        uint64_t f = p->free_stack[j];
        if (f >= p->next_fresh)
            return fail(c, "pool %d free stack entry %" PRIu64 ": frame %" PRIu64
                        " at or above next_fresh %" PRIu64, i, j, f, p->next_fresh);
        if (bit_test(seen->on_stack, f))
            return fail(c, "pool %d frame %" PRIu64 " is twice on the free stack", i, f);
        bit_set(seen->on_stack, f);
        uint8_t fl = p->fflags[f];
        if (fl & (CDM_FRAME_USED | CDM_FRAME_RETIRED))
            return fail(c, "pool %d frame %" PRIu64 " on the free stack has flags %#x", i, f, fl);
        if (block_isolated(p, f))
            return fail(c, "pool %d frame %" PRIu64 " on the free stack is in isolated block %"
                        PRIu64, i, f, f / p->block_pages);
        if ((fl & CDM_FRAME_STALE) && j < p->nfree_stack - p->nresident)
            return fail(c, "pool %d frame %" PRIu64 " is stale below the resident window", i, f);
    }

    /* Every frame below next_fresh. */
    uint64_t used = 0, retired = 0, held = 0;
    for (uint64_t f = 0; f < p->next_fresh; f++) {
        uint8_t fl = p->fflags[f];
        if ((fl & CDM_FRAME_POISONED) && !(fl & CDM_FRAME_RETIRED))
            return fail(c, "pool %d frame %" PRIu64 " is poisoned but not retired", i, f);
        if (fl & CDM_FRAME_USED) {
            used++;
            if (!p->rmap[f])
                held++;
            if (fl & CDM_FRAME_STALE)
                return fail(c, "pool %d frame %" PRIu64 " is used and stale", i, f);
            continue;
        }
        if (p->rmap[f])
            return fail(c, "pool %d free frame %" PRIu64 " has owner %#" PRIx64, i, f, p->rmap[f]);
        if (fl & CDM_FRAME_RETIRED) {
            retired++;
            continue;
        }
        if (!block_isolated(p, f) && !bit_test(seen->on_stack, f))
            return fail(c, "pool %d free frame %" PRIu64 " below next_fresh is not on the free"
                        " stack", i, f);
        if ((fl & CDM_FRAME_STALE) && !bit_test(seen->on_stack, f))
            return fail(c, "pool %d frame %" PRIu64 " is stale off the free stack", i, f);
    }
    /* Frames never used: only the pages of fflags the host has backed can
     * hold a flag (a retired fresh frame), so a terabyte pool costs little. */
    struct fresh_scan s = {c, i, p, p->next_fresh / PAGE * PAGE, 0};
    if (p->next_fresh < p->npages
        && each_backed_page(p->fflags + s.from, p->npages - s.from, fresh_page, &s))
        return -EINVAL;
    retired += s.retired;
    if (p->nr_used != used)
        return fail(c, "pool %d nr_used %" PRIu64 ", %" PRIu64 " frames used", i, p->nr_used, used);
    if (p->nr_retired != retired)
        return fail(c, "pool %d nr_retired %" PRIu64 ", %" PRIu64 " free frames retired", i,
                    p->nr_retired, retired);
    if (p->nr_held != held)
        return fail(c, "pool %d nr_held %" PRIu64 ", %" PRIu64 " used frames without owner", i,
                    p->nr_held, held);
    return 0;
}

/* ----------------------------------------------------------- page tables */

struct region_scan {
    struct check *c;
    struct cdm_machine *m;
    struct cdm_region *r;
    struct pool_seen *seen;
    uint64_t resident[CDM_MAX_POOLS];
    uint64_t pinned, poisoned, duplicated;
};

static int check_entry(struct region_scan *s, uint64_t i, uint64_t pte)
{
    struct check *c = s->c;
    struct cdm_machine *m = s->m;
    struct cdm_region *r = s->r;
    if (i >= r->npages)
        return fail(c, "region %u entry %" PRIu64 " beyond npages %" PRIu64 " is %#" PRIx64,
                    r->id, i, r->npages, pte);
    if (pte & PTE_NEW)
        return fail(c, "region %u page %" PRIu64 " keeps the internal PTE_NEW: %#" PRIx64,
                    r->id, i, pte);
    if ((pte & CDM_PTE_LOCKED) && (pte & CDM_PTE_MIGRATING))
        return fail(c, "region %u page %" PRIu64 " is both locked and migrating", r->id, i);
    if (pte & CDM_PTE_PINNED)
        s->pinned++;
    if ((pte & CDM_PTE_DUPLICATED) && (pte & CDM_PTE_PRESENT))
        s->duplicated++;
    if (pte & CDM_PTE_POISONED) {
        s->poisoned++;
        if (pte & ~(CDM_PTE_POISONED | CDM_PTE_POOL_MASK | CDM_PTE_PFN_MASK))
            return fail(c, "region %u poisoned page %" PRIu64 " has other bits: %#" PRIx64,
                        r->id, i, pte);
        return 0;
    }
    if (!(pte & CDM_PTE_PRESENT)) {
        /* A migration's placeholder for a page never touched. */
        if (pte != CDM_PTE_MIGRATING && pte != CDM_PTE_LOCKED)
            return fail(c, "region %u page %" PRIu64 " has no frame but bits %#" PRIx64,
                        r->id, i, pte);
        return 0;
    }
    if ((pte & CDM_PTE_NUMA) && (pte & CDM_PTE_PRIVATE))
        return fail(c, "region %u page %" PRIu64 " is device-private with a NUMA hinting mark",
                    r->id, i);
    int pool = pte_pool(pte);
    if (pool >= m->npools)
        return fail(c, "region %u page %" PRIu64 " is on pool %d of %d", r->id, i, pool, m->npools);
    struct cdm_pool *p = &m->pools[pool];
    uint64_t pfn = pte_pfn(pte);
    if (pfn < p->base_pfn || pfn >= p->base_pfn + p->next_fresh)
        return fail(c, "region %u page %" PRIu64 " PFN %#" PRIx64 " is not a frame pool %d has"
                    " handed out", r->id, i, pfn, pool);
    if (!(pte & CDM_PTE_PRIVATE) != !(p->flags & CDM_POOL_PRIVATE))
        return fail(c, "region %u page %" PRIu64 ": PRIVATE bit disagrees with pool %d", r->id, i,
                    pool);
    uint64_t f = pfn - p->base_pfn;
    if (!(p->fflags[f] & CDM_FRAME_USED))
        return fail(c, "region %u page %" PRIu64 " is on pool %d frame %" PRIu64 ", which is"
                    " not used (flags %#x)", r->id, i, pool, f, p->fflags[f]);
    uint64_t owner = ((uint64_t)(r->id + 1) << 40) | i;
    if (p->rmap[f] != owner)
        return fail(c, "region %u page %" PRIu64 " is on pool %d frame %" PRIu64 ", whose"
                    " reverse map says %#" PRIx64, r->id, i, pool, f, p->rmap[f]);
    struct pool_seen *seen = &s->seen[pool];
    if (bit_test(seen->claimed, f))
        return fail(c, "pool %d frame %" PRIu64 " is mapped twice (again by region %u page %"
                    PRIu64 ")", pool, f, r->id, i);
    bit_set(seen->claimed, f);
    s->resident[pool]++;
    if (pte & CDM_PTE_CPU)
        seen->mapped++;
    if (pte & CDM_PTE_DIRTY)
        seen->dirty++;
    if (pte & CDM_PTE_PINNED)
        seen->pinned++;
    return 0;
}

/* One page of the pte mapping: one chunk of entries. */
static int pte_page(void *arg, uint64_t chunk)
{
    struct region_scan *s = arg;
    struct cdm_region *r = s->r;
    uint64_t lo = chunk << CHUNK_SHIFT, any = 0;
    for (uint64_t i = lo; i < lo + CHUNK; i++) {
        uint64_t pte = r->pte[i];
        if (!pte)
            continue;
        any = 1;
        int ret = check_entry(s, i, pte);
        if (ret)
            return ret;
    }
    if (any && !bit_test(r->chunks, chunk))
        return fail(s->c, "region %u: chunk %" PRIu64 " holds entries but is not marked",
                    r->id, chunk);
    return 0;
}

/* One page of the chunk bitmap: every non-zero word has its summary bit. */
static int chunks_page(void *arg, uint64_t page)
{
    struct region_scan *s = arg;
    struct cdm_region *r = s->r;
    uint64_t words = ((r->cap >> CHUNK_SHIFT) + 63) / 64;
    uint64_t lo = page * (PAGE / sizeof(uint64_t));
    uint64_t hi = lo + PAGE / sizeof(uint64_t) < words ? lo + PAGE / sizeof(uint64_t) : words;
    for (uint64_t w = lo; w < hi; w++)
        if (r->chunks[w] && !bit_test(r->summary, w))
            return fail(s->c, "region %u: chunk word %" PRIu64 " is not zero but its summary"
                        " bit is clear", r->id, w);
    return 0;
}

static int check_region(struct check *c, struct cdm_machine *m, struct cdm_region *r,
                        struct pool_seen *seen)
{
    if (r->npages > r->cap)
        return fail(c, "region %u npages %" PRIu64 " beyond cap %" PRIu64, r->id, r->npages, r->cap);
    if (r->npages != (r->size >> CDM_PAGE_SHIFT) + ((r->size & (PAGE - 1)) != 0))
        return fail(c, "region %u npages %" PRIu64 " is not its size %" PRIu64 " in pages",
                    r->id, r->npages, r->size);
    struct region_scan s = {.c = c, .m = m, .r = r, .seen = seen};
    if (r->cap) {
        each_backed_page(r->chunks, ((r->cap >> CHUNK_SHIFT) + 63) / 64 * sizeof(uint64_t),
                         chunks_page, &s);
        if (c->failed)
            return -EINVAL;
        each_backed_page(r->pte, r->cap * sizeof(uint64_t), pte_page, &s);
        if (c->failed)
            return -EINVAL;
    }
    for (int k = 0; k < CDM_MAX_POOLS; k++)
        if (r->resident[k] != s.resident[k])
            return fail(c, "region %u resident[%d] %" PRIu64 ", %" PRIu64 " pages present",
                        r->id, k, r->resident[k], s.resident[k]);
    if (r->nr_pinned != s.pinned)
        return fail(c, "region %u nr_pinned %" PRIu64 ", %" PRIu64 " pages pinned", r->id,
                    r->nr_pinned, s.pinned);
    if (r->nr_poisoned != s.poisoned)
        return fail(c, "region %u nr_poisoned %" PRIu64 ", %" PRIu64 " pages poisoned", r->id,
                    r->nr_poisoned, s.poisoned);
    if (r->nr_duplicated != s.duplicated)
        return fail(c, "region %u nr_duplicated %" PRIu64 ", %" PRIu64 " pages duplicated", r->id,
                    r->nr_duplicated, s.duplicated);
    return 0;
}

/* ------------------------------------------------------------ entry point */

int cdm_machine_check(struct cdm_machine *m, struct cdm_region *const *regions,
                      uint64_t nregions, char *msg, uint64_t msglen)
{
    struct check c = {msg, msglen, 0};
    struct pool_seen seen[CDM_MAX_POOLS];
    memset(seen, 0, sizeof(seen));
    if (msg && msglen)
        msg[0] = 0;
    machine_lock(m);
    if (m->drop_len)
        fail(&c, "%" PRIu64 " frame drops pending with the lock free", m->drop_len);
    for (int i = 0; i < m->npools && !c.failed; i++)
        check_pool(&c, m, i, &seen[i]);
    for (uint64_t k = 0; k < nregions && !c.failed; k++)
        for (uint64_t j = 0; j < k && !c.failed; j++)
            if (regions[j]->id == regions[k]->id)
                fail(&c, "two regions have id %u", regions[k]->id);
    for (uint64_t k = 0; k < nregions && !c.failed; k++)
        check_region(&c, m, regions[k], seen);
    for (int i = 0; i < m->npools && !c.failed; i++) {
        struct cdm_pool *p = &m->pools[i];
        if (p->nr_mapped != seen[i].mapped)
            fail(&c, "pool %d nr_mapped %" PRIu64 ", %" PRIu64 " pages CPU-mapped", i,
                 p->nr_mapped, seen[i].mapped);
        else if (p->nr_dirty != seen[i].dirty)
            fail(&c, "pool %d nr_dirty %" PRIu64 ", %" PRIu64 " pages dirty", i, p->nr_dirty,
                 seen[i].dirty);
        else if (p->nr_pinned != seen[i].pinned)
            fail(&c, "pool %d nr_pinned %" PRIu64 ", %" PRIu64 " pages pinned", i, p->nr_pinned,
                 seen[i].pinned);
        /* Every owned frame is the frame of the page its reverse map names. */
        for (uint64_t f = 0; f < p->next_fresh && !c.failed; f++)
            if (p->rmap[f] && !bit_test(seen[i].claimed, f))
                fail(&c, "pool %d frame %" PRIu64 " is owned by region %" PRIu64 " page %"
                     PRIu64 ", which is not on it", i, f, (p->rmap[f] >> 40) - 1,
                     (uint64_t)(p->rmap[f] & CDM_PTE_PFN_MASK));
    }
    machine_unlock(m);
    for (int i = 0; i < CDM_MAX_POOLS; i++) {
        free(seen[i].on_stack);
        free(seen[i].claimed);
    }
    return c.failed ? -EINVAL : 0;
}
