/* memory_failure.c — frames taken out of use (retire, unretire) and pages
 * that lose their frame to a memory failure (poison, link loss of a pool)
 * (the kernel's mm/memory-failure.c). */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>

/* -------------------------------------------------------------- lifecycle */

int cdm_frame_retire(struct cdm_machine *m, uint64_t pfn, int flags)
{
    uint64_t lo, hi;
    machine_lock(m);
    int pool = frame_range(m, pfn, 1, &lo, &hi);
    if (pool < 0) {
        machine_unlock(m);
        return -EINVAL;
    }
    struct cdm_pool *p = &m->pools[pool];
    int ret;
    uint8_t fl = p->fflags[lo];
    if (fl & CDM_FRAME_RETIRED) {
        ret = -EALREADY;
    } else if (fl & CDM_FRAME_USED) {
        /* frame_free() retires it when its page leaves. */
        p->fflags[lo] |= (uint8_t)(flags | CDM_FRAME_RETIRED);
        ret = 1;
    } else {
        if (lo < p->next_fresh && !block_isolated(p, lo))
            stack_remove(m, p, lo, lo + 1);
        p->fflags[lo] |= (uint8_t)(flags | CDM_FRAME_RETIRED);
        p->nr_retired++;
        drop_frame(m, p, lo);
        ret = 0;
    }
    machine_unlock(m);
    return ret;
}

uint64_t cdm_frames_unretire(struct cdm_machine *m, uint64_t pfn, uint64_t n)
{
    uint64_t lo, hi, count = 0;
    machine_lock(m);
    int pool = frame_range(m, pfn, n, &lo, &hi);
    struct cdm_pool *p = &m->pools[pool < 0 ? 0 : pool];
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
            stack_push(m, p, f);
    }
    machine_unlock(m);
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
    frame_free(m, p, f);       /* drops the data; counted as retired */
}

int cdm_page_poison(struct cdm_machine *m, struct cdm_region *r, uint64_t page, uint64_t pfn)
{
    int ret = 0;
    machine_lock(m);
    uint64_t pte = page < r->npages ? r->pte[page] : 0;
    if (!(pte & CDM_PTE_PRESENT) || (pte & CDM_PTE_POISONED) || pte_pfn(pte) != pfn)
        ret = -ENOENT;
    else if (pte & (CDM_PTE_LOCKED | CDM_PTE_MIGRATING))
        ret = -EAGAIN;
    else
        page_poison(m, r, page);
    machine_unlock(m);
    return ret;
}

uint64_t cdm_region_poison_pool(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                uint64_t n, int pool, uint64_t *busy)
{
    uint64_t count = 0, lo, hi;
    *busy = 0;
    machine_lock(m);
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
    machine_unlock(m);
    return count;
}
