/*
 * NUMA hinting in the page table (kernel/sched/fair.c task_numa_work,
 * mm/mprotect.c change_prot_numa): the scanner marks the pages whose CPU
 * copies it is about to unmap, and the hinting fault takes the mark back.
 * What a fault does with it (the two-access filter, the migration) is
 * Python's (cdmfs/mm/numa_balancing.py); cdm_region_serve leaves a READ of
 * a marked page to it.
 */
#include <errno.h>

#include "cdmcore.h"
#include "internal.h"

/* Pages that may take a hinting mark: CPU-mapped, on a node, free to move. */
#define NUMA_SKIP (CDM_PTE_POISONED | CDM_PTE_LOCKED | CDM_PTE_MIGRATING | CDM_PTE_PINNED \
                   | CDM_PTE_PRIVATE | CDM_PTE_NUMA)

uint64_t cdm_region_numa_mark(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                              uint64_t n, uint64_t pools, uint64_t max, uint64_t *next)
{
    uint64_t marked = 0, lo, hi;
    machine_lock(m);
    uint64_t end = walk_end(r, first, n);
    *next = end;
    for (uint64_t x = first; marked < max && next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            uint64_t pte = r->pte[i];
            seen |= pte;
            if ((pte & (CDM_PTE_PRESENT | CDM_PTE_CPU)) != (CDM_PTE_PRESENT | CDM_PTE_CPU)
                || (pte & NUMA_SKIP) || !(pools & (1ULL << pte_pool(pte))))
                continue;
            pte_store(r, i, pte | CDM_PTE_NUMA);
            if (++marked == max) {
                *next = i + 1;
                break;
            }
        }
        if (marked < max)
            span_settle(r, lo, hi, seen);
    }
    machine_unlock(m);
    return marked;
}

uint64_t cdm_region_numa_take(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                              uint64_t n, uint64_t *out)
{
    uint64_t taken = 0;
    machine_lock(m);
    for (uint64_t k = 0; k < n; k++) {
        if (!range_page(r, first, k)) {
            out[k] = 0;
            continue;
        }
        uint64_t pte = r->pte[first + k];
        out[k] = pte;
        if (pte & CDM_PTE_NUMA) {
            pte_store(r, first + k, pte & ~CDM_PTE_NUMA);
            taken++;
        }
    }
    machine_unlock(m);
    return taken;
}
