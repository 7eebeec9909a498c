/* hints.c — read duplication (read_mostly advice, issue 15): a device's
 * read-only copy of a page that stays where it is.  The page's entry carries
 * CDM_PTE_DUPLICATED while any device holds a duplicate; cdm_region_serve
 * leaves a WRITE of such a page to Python, which collapses the duplicates
 * first (a reader must never see a stale copy). */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <string.h>

uint64_t cdm_region_duplicate(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                              uint64_t n, const uint64_t *dst, uint8_t *done)
{
    uint64_t count = 0;
    machine_lock(m);
    for (uint64_t k = 0; k < n; k++) {
        done[k] = 0;
        if (!dst[k] || !range_page(r, first, k))
            continue;
        uint64_t i = first + k, pte = r->pte[i];
        if ((pte & (CDM_PTE_PRESENT | CDM_PTE_POISONED | CDM_PTE_LOCKED | CDM_PTE_MIGRATING |
                    CDM_PTE_PRIVATE)) != CDM_PTE_PRESENT)
            continue;
        /* The duplicate's frame: one the caller holds (handed out, no owner). */
        int pool = pfn_pool(m, dst[k]);
        if (pool < 0)
            continue;
        struct cdm_pool *p = &m->pools[pool];
        uint64_t f = dst[k] - p->base_pfn;
        if (!(p->fflags[f] & CDM_FRAME_USED) || p->rmap[f])
            continue;
        memcpy(pfn_addr(m, dst[k]), frame_addr(m, pte), PAGE);
        if (!(pte & CDM_PTE_DUPLICATED))
            pte_set(m, r, i, pte | CDM_PTE_DUPLICATED);
        done[k] = 1;
        count++;
    }
    machine_unlock(m);
    return count;
}

uint64_t cdm_region_collapse(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                             uint64_t n)
{
    uint64_t c = 0, lo, hi;
    machine_lock(m);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi)
        for (uint64_t i = lo; i < hi; i++)
            if (r->pte[i] & CDM_PTE_DUPLICATED) {
                pte_set(m, r, i, r->pte[i] & ~CDM_PTE_DUPLICATED);
                c++;
            }
    machine_unlock(m);
    return c;
}
