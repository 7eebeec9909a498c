/* gup.c — long-term pins of a region's pages: a pinned page never migrates
 * and its frame never leaves (FOLL_LONGTERM in the kernel's mm/gup.c). */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>

/* -------------------------------------------------------------- lifecycle */

int cdm_region_pin(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                   int pin, uint64_t deny_pools, struct cdm_rw_result *res)
{
    int ret = 0;
    uint64_t lo, hi;
    res->allocated = 0;
    res->page = 0;
    machine_lock(m);
    uint64_t end = walk_end(r, first, n);
    if (pin) {
        if (!range_inside(r, first, n)) {
            res->page = first > r->npages ? first : r->npages;
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
    machine_unlock(m);
    return ret;
}
