/* hotplug.c — memory blocks: a pool cut into blocks, block and pool
 * isolation (offlining), and the census and owners of a range of frames
 * (the kernel's mm/memory_hotplug.c). */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>

/* -------------------------------------------------------------- lifecycle */

int cdm_pool_set_blocks(struct cdm_machine *m, int pool, uint64_t block_pages)
{
    if (block_pages == 0)
        return -EINVAL;
    int ret = 0;
    machine_lock(m);
    struct cdm_pool *p = pool_valid(m, pool) ? &m->pools[pool] : NULL;
    if (!p || p->block_pages || p->base_pfn % block_pages) {
        ret = -EINVAL;
    } else {
        uint64_t nblocks = p->npages / block_pages + (p->npages % block_pages != 0);
        uint8_t *b = calloc(nblocks, 1);
        if (!b) {
            ret = -ENOMEM;
        } else {
            p->bflags = b;
            p->nblocks = nblocks;
            p->block_pages = block_pages;
        }
    }
    machine_unlock(m);
    return ret;
}

int64_t cdm_block_isolate(struct cdm_machine *m, int pool, uint64_t block, int isolate)
{
    machine_lock(m);
    if (!pool_valid(m, pool) || block >= m->pools[pool].nblocks) {
        machine_unlock(m);
        return -EINVAL;
    }
    struct cdm_pool *p = &m->pools[pool];
    uint64_t lo = block * p->block_pages;
    uint64_t hi = p->block_pages < p->npages - lo ? lo + p->block_pages : p->npages;
    int64_t given = 0;
    if (isolate && !(p->bflags[block] & CDM_BLOCK_ISOLATED)) {
        p->bflags[block] |= CDM_BLOCK_ISOLATED;
        stack_remove(m, p, lo, hi);
    } else if (!isolate && (p->bflags[block] & CDM_BLOCK_ISOLATED)) {
        p->bflags[block] &= ~CDM_BLOCK_ISOLATED;
        /* While isolated none of its frames was on the stack: the free ones
         * below next_fresh go back now, each once; the bump pointer will
         * reach the others. */
        uint64_t end = hi < p->next_fresh ? hi : p->next_fresh;
        for (uint64_t f = lo; f < end; f++)
            if (!(p->fflags[f] & (CDM_FRAME_USED | CDM_FRAME_RETIRED)) && stack_push(m, p, f) == 0)
                given++;
        for (uint64_t f = end > lo ? end : lo; f < hi; f++)
            if (!(p->fflags[f] & CDM_FRAME_RETIRED))
                given++;
    }
    machine_unlock(m);
    return given;
}

void cdm_pool_isolate(struct cdm_machine *m, int pool, int isolate)
{
    machine_lock(m);
    if (!pool_valid(m, pool))
        ;
    else if (isolate)
        m->pools[pool].flags |= CDM_POOL_ISOLATED;
    else
        m->pools[pool].flags &= ~CDM_POOL_ISOLATED;
    machine_unlock(m);
}

void cdm_frames_census(struct cdm_machine *m, uint64_t pfn, uint64_t n, uint64_t *out)
{
    uint64_t lo, hi;
    out[0] = out[1] = 0;
    machine_lock(m);
    int pool = frame_range(m, pfn, n, &lo, &hi);
    for (uint64_t f = lo; f < hi; f++) {     /* none if pfn is in no pool */
        uint8_t fl = m->pools[pool].fflags[f];
        if (fl & CDM_FRAME_USED)
            out[0]++;
        if ((fl & CDM_FRAME_RETIRED) && !(fl & CDM_FRAME_USED))
            out[1]++;
    }
    machine_unlock(m);
}

uint64_t cdm_frames_owners(struct cdm_machine *m, uint64_t pfn, uint64_t n, uint32_t *region,
                           uint64_t *page, uint64_t max, uint64_t *next)
{
    uint64_t lo, hi, count = 0;
    *next = n > UINT64_MAX - pfn ? UINT64_MAX : pfn + n;   /* done: nothing left below 2^64 */
    machine_lock(m);
    int pool = frame_range(m, pfn, n, &lo, &hi);
    if (pool < 0) {
        machine_unlock(m);
        return 0;
    }
    struct cdm_pool *p = &m->pools[pool];
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
    machine_unlock(m);
    return count;
}
