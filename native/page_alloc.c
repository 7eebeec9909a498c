/* page_alloc.c — pools and their frames: the free stack, frame alloc/free,
 * the resident window of stale frees and their MADV_DONTNEED drops, pool
 * counters, cdm_pool_* and cdm_pfn_* (the kernel's mm/page_alloc.c). */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* ---------------------------------------------------------------- pools */

static int pool_add(struct cdm_machine *m, uint64_t base_pfn, uint64_t npages, int flags);

struct cdm_machine *cdm_machine_new(void)
{
    struct cdm_machine *m = calloc(1, sizeof(*m));
    if (m) {
        pthread_mutex_init(&m->lock, NULL);
        m->cpu_pool = -1;
    }
    return m;
}

void cdm_machine_set_cpu_pool(struct cdm_machine *m, int pool)
{
    machine_lock(m);
    m->cpu_pool = pool;
    machine_unlock(m);
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
    machine_policies_free(m);
    machine_faultbacks_free(m);
    machine_trace_free(m);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

int cdm_pool_add(struct cdm_machine *m, uint64_t base_pfn, uint64_t npages, int flags)
{
    machine_lock(m);
    int ret = pool_add(m, base_pfn, npages, flags);
    machine_unlock(m);
    return ret;
}

/* Caller holds m->lock. */
static int pool_add(struct cdm_machine *m, uint64_t base_pfn, uint64_t npages, int flags)
{
    /* The PFNs must fit a page-table entry; the sum is not taken before the
     * terms are known not to wrap. */
    if (m->npools >= CDM_MAX_POOLS || npages == 0 || npages > CDM_PTE_PFN_MASK
        || base_pfn > CDM_PTE_PFN_MASK - npages)
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
    if (!p->base || !p->rmap || !p->fflags) {
        if (p->base)
            munmap(p->base, npages * PAGE);
        if (p->rmap)
            munmap(p->rmap, npages * sizeof(uint64_t));
        if (p->fflags)
            munmap(p->fflags, npages);
        memset(p, 0, sizeof(*p));
        return -ENOMEM;
    }
    p->base_pfn = base_pfn;
    p->npages = npages;
    p->flags = flags;
    return m->npools++;
}

uint64_t cdm_pool_free_pages(struct cdm_machine *m, int pool)
{
    uint64_t n = 0;
    machine_lock(m);
    if (pool_valid(m, pool)) {
        struct cdm_pool *p = &m->pools[pool];
        n = p->npages - p->nr_used - p->nr_retired;
    }
    machine_unlock(m);
    return n;
}

int cdm_pool_snapshot(struct cdm_machine *m, int pool, struct cdm_pool_stats *out)
{
    machine_lock(m);
    if (!pool_valid(m, pool)) {
        machine_unlock(m);
        return -EINVAL;
    }
    const struct cdm_pool *p = &m->pools[pool];
    out->base_pfn = p->base_pfn;
    out->npages = p->npages;
    out->nr_free = p->npages - p->nr_used - p->nr_retired;
    out->nr_used = p->nr_used;
    out->nr_retired = p->nr_retired;
    out->nr_mapped = p->nr_mapped;
    out->nr_dirty = p->nr_dirty;
    out->nr_pinned = p->nr_pinned;
    out->nr_held = p->nr_held;
    memcpy(out->counters, p->counters, sizeof(out->counters));
    out->flags = p->flags;
    machine_unlock(m);
    return 0;
}

void cdm_pool_fail_alloc(struct cdm_machine *m, int pool, uint64_t n)
{
    machine_lock(m);
    if (pool_valid(m, pool))
        m->pools[pool].fail_alloc = n;
    machine_unlock(m);
}

/* Freed frames give their host memory back with madvise(MADV_DONTNEED), which
 * also makes them read as zeros for the next user.  The newest
 * CDM_RESIDENT_FREE_PAGES frees of a pool are kept (CDM_FRAME_STALE) and
 * dropped only as newer ones push them out: a host page fault costs more than
 * the copy into the page, and device memory is always backed.  Consecutive
 * drops of adjacent frames (a migrated batch, a truncated range) are gathered
 * into one call, pending in the machine (m->drop_*) under m->lock:
 * drop_flush() runs before any allocation and in machine_unlock(), so a
 * pending drop never outlives the lock and no frame is reused (by this thread
 * or another) before it is dropped.  Caller holds m->lock. */
void drop_flush(struct cdm_machine *m)
{
    if (m->drop_len) {
        struct cdm_pool *p = &m->pools[m->drop_pool];
        madvise(p->base + m->drop_start * PAGE, m->drop_len * PAGE, MADV_DONTNEED);
    }
    m->drop_len = 0;
}

void drop_frame(struct cdm_machine *m, struct cdm_pool *p, uint64_t f)
{
    int pool = (int)(p - m->pools);
    if (m->drop_len && m->drop_pool == pool && f == m->drop_start + m->drop_len) {
        m->drop_len++;
        return;
    }
    if (m->drop_len && m->drop_pool == pool && f + 1 == m->drop_start) {
        m->drop_start--;
        m->drop_len++;
        return;
    }
    drop_flush(m);
    m->drop_pool = pool;
    m->drop_start = f;
    m->drop_len = 1;
}

/* Free frame f leaves the allocator's reach (isolated, retired): its bytes go. */
static void frame_unstale(struct cdm_machine *m, struct cdm_pool *p, uint64_t f)
{
    if (p->fflags[f] & CDM_FRAME_STALE) {
        p->fflags[f] &= (uint8_t)~CDM_FRAME_STALE;
        drop_frame(m, p, f);
    }
}

/* Pushes free frame f on the free stack; -1 if the host has no memory for
 * it (the frame is then leaked as retired).  Caller holds m->lock. */
int stack_push(struct cdm_machine *m, struct cdm_pool *p, uint64_t f)
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
        frame_unstale(m, p, p->free_stack[p->nfree_stack - p->nresident]);
        p->nresident--;
    }
    return 0;
}

/* Removes the frames [lo, hi) from the free stack.  Caller holds m->lock. */
void stack_remove(struct cdm_machine *m, struct cdm_pool *p, uint64_t lo, uint64_t hi)
{
    uint64_t k = 0;
    for (uint64_t j = 0; j < p->nfree_stack; j++)
        if (p->free_stack[j] < lo || p->free_stack[j] >= hi)
            p->free_stack[k++] = p->free_stack[j];
        else
            frame_unstale(m, p, p->free_stack[j]);
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
int64_t frame_alloc(struct cdm_machine *m, struct cdm_pool *p, int zero)
{
    drop_flush(m);
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

/* The kernel's zone_statistics(): a page placed on pool when preferred was
 * asked for, by a CPU of the node of pool local, is a hit there or a miss
 * there and a foreign on preferred, and local or other.  Device-private
 * memory is not a node (it has no numastat): nothing is counted for a page
 * placed there.  Caller holds m->lock. */
void numa_count(struct cdm_machine *m, int pool, int preferred, int local)
{
    struct cdm_pool *p = &m->pools[pool];
    if (p->flags & CDM_POOL_PRIVATE)
        return;
    if (pool == preferred) {
        p->counters[CDM_NUMA_HIT]++;
    } else {
        p->counters[CDM_NUMA_MISS]++;
        m->pools[preferred].counters[CDM_NUMA_FOREIGN]++;
    }
    p->counters[pool == local ? CDM_LOCAL_NODE : CDM_OTHER_NODE]++;
}

/* The NUMA events of page idx placed in pool by a policy's plan: its
 * intended pool is the preferred one (for preferred_many, the local pool
 * once the page lands outside the nodemask), and an interleaved page that
 * got its slot's pool is also an interleave hit (alloc_pages_mpol()).
 * Caller holds m->lock. */
void numa_account(struct cdm_machine *m, uint64_t idx, int pool, const struct cdm_plan *plan)
{
    int intended = plan->table[idx % plan->ntable];
    if (plan->first_pools && !(plan->first_pools & (1ULL << pool)))
        intended = plan->spill;
    numa_count(m, pool, intended, plan->local);
    if (pool == intended && plan->interleave && !(m->pools[pool].flags & CDM_POOL_PRIVATE))
        m->pools[pool].counters[CDM_INTERLEAVE_HIT]++;
}

/* Returns frame f of pool p to the allocator, keeping its bytes for a while
 * (see drop_frame); a frame that cannot be reused soon is dropped at once.
 * Caller holds m->lock. */
void frame_free(struct cdm_machine *m, struct cdm_pool *p, uint64_t f)
{
    p->rmap[f] = 0;
    p->fflags[f] &= ~CDM_FRAME_USED;
    p->nr_used--;
    p->counters[CDM_PGFREE]++;
    if (p->fflags[f] & CDM_FRAME_RETIRED) {
        drop_frame(m, p, f);
        p->nr_retired++;
        return;
    }
    int in_isolated_block = block_isolated(p, f);
    if (in_isolated_block || (p->flags & CDM_POOL_ISOLATED)) {
        drop_frame(m, p, f);
        if (in_isolated_block)
            return;     /* back to the allocator when the block is released */
    } else {
        p->fflags[f] |= CDM_FRAME_STALE;
    }
    /* Out of host memory for the free list, stack_push leaks the frame as
     * retired rather than corrupt the allocator. */
    if (stack_push(m, p, f) < 0)
        frame_unstale(m, p, f);
}

/* Undoes the latest frame_alloc() of pool p that is still standing (calls
 * backing out, newest first): the frame goes back where it came from and no
 * event is counted, so an all-or-nothing call that fails changes nothing.
 * The frame must not have been written.  Caller holds m->lock. */
void frame_unalloc(struct cdm_pool *p, uint64_t f)
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
    machine_lock(m);
    if (!pool_valid(m, pool)) {
        machine_unlock(m);
        return -EINVAL;
    }
    struct cdm_pool *p = &m->pools[pool];
    for (uint64_t i = 0; i < n; i++) {
        int64_t f = frame_alloc(m, p, 1);
        if (f < 0) {
            while (i--)
                frame_unalloc(p, out[i] - p->base_pfn);
            machine_unlock(m);
            return -ENOMEM;
        }
        out[i] = p->base_pfn + (uint64_t)f;
    }
    p->nr_held += n;    /* no owner: the caller holds them */
    machine_unlock(m);
    return 0;
}

int pfn_pool(struct cdm_machine *m, uint64_t pfn)
{
    for (int i = 0; i < m->npools; i++) {
        struct cdm_pool *p = &m->pools[i];
        if (pfn >= p->base_pfn && pfn - p->base_pfn < p->npages)
            return i;
    }
    return -1;
}

int cdm_pfn_pool(struct cdm_machine *m, uint64_t pfn)
{
    machine_lock(m);
    int pool = pfn_pool(m, pfn);
    machine_unlock(m);
    return pool;
}

void cdm_pool_free(struct cdm_machine *m, const uint64_t *pfns, uint64_t n)
{
    machine_lock(m);
    for (uint64_t i = 0; i < n; i++) {
        int pool = pfn_pool(m, pfns[i]);
        if (pool < 0)
            continue;
        struct cdm_pool *p = &m->pools[pool];
        uint64_t f = pfns[i] - p->base_pfn;
        if (!(p->fflags[f] & CDM_FRAME_USED))
            continue;   /* free already: a second free would put it twice on the stack */
        if (!p->rmap[f] && p->nr_held)
            p->nr_held--;
        frame_free(m, p, f);
    }
    machine_unlock(m);
}

/* The frame's bytes, or NULL outside every pool.  Caller holds m->lock. */
uint8_t *pfn_addr(struct cdm_machine *m, uint64_t pfn)
{
    int pool = pfn_pool(m, pfn);
    if (pool < 0)
        return NULL;
    return m->pools[pool].base + (pfn - m->pools[pool].base_pfn) * PAGE;
}

uint8_t *cdm_pfn_addr(struct cdm_machine *m, uint64_t pfn)
{
    machine_lock(m);
    uint8_t *addr = pfn_addr(m, pfn);
    machine_unlock(m);
    return addr;
}

int cdm_pfn_owner(struct cdm_machine *m, uint64_t pfn, uint32_t *region, uint64_t *page)
{
    machine_lock(m);
    int pool = pfn_pool(m, pfn);
    uint64_t owner = pool < 0 ? 0 : m->pools[pool].rmap[pfn - m->pools[pool].base_pfn];
    machine_unlock(m);
    if (pool < 0)
        return -EINVAL;
    if (!owner)
        return -ENOENT;
    *region = (uint32_t)((owner >> 40) - 1);
    *page = owner & CDM_PTE_PFN_MASK;
    return 0;
}

/* The frames of [pfn, pfn + n) that are in the pool of pfn: [*lo, *hi)
 * frame indices, and the pool, or -1 if pfn is in none.  Caller holds m->lock. */
int frame_range(struct cdm_machine *m, uint64_t pfn, uint64_t n, uint64_t *lo, uint64_t *hi)
{
    int pool = pfn_pool(m, pfn);
    if (pool < 0) {
        *lo = *hi = 0;
        return -1;
    }
    struct cdm_pool *p = &m->pools[pool];
    *lo = pfn - p->base_pfn;
    *hi = n < p->npages - *lo ? *lo + n : p->npages;   /* n may reach past 2^64 */
    return pool;
}
