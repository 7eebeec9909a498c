/* migrate.c — the steps of a migration (collect, lock, alloc, copy, finalize,
 * abort), frame copies, and the readers of its status arrays (the kernel's
 * mm/migrate_device.c). */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* ------------------------------------------------------------ migration */

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

/* The pool of dst if it is a frame a migration holds: handed out (USED) and
 * owned by no page (cdm_migrate_alloc's targets until finalize), else -1: a
 * PFN outside every pool, a free frame, a frame a page owns (a duplicate in
 * dst that an earlier page already took, too).  Such a dst is not the
 * caller's to write, install or free.  Caller holds m->lock. */
static int held_frame_pool(struct cdm_machine *m, uint64_t dst)
{
    int pool = pfn_pool(m, dst);
    if (pool < 0)
        return -1;
    const struct cdm_pool *p = &m->pools[pool];
    uint64_t f = dst - p->base_pfn;
    if (!(p->fflags[f] & CDM_FRAME_USED) || p->rmap[f] || !p->nr_held)
        return -1;
    return pool;
}

/* Whether a saved entry names a frame of the pool it names.  Caller holds
 * m->lock. */
static int src_valid(struct cdm_machine *m, uint64_t pte)
{
    int pool = pte_pool(pte);
    return pool_valid(m, pool) && pte_pfn(pte) >= m->pools[pool].base_pfn
        && pte_pfn(pte) - m->pools[pool].base_pfn < m->pools[pool].npages;
}

/* Gives back page i that a migration locked and will not move: the entry
 * keeps its frame (or becomes absent again, a placeholder), unlocked.
 * Caller holds m->lock. */
static void page_unlock(struct cdm_machine *m, struct cdm_region *r, uint64_t i)
{
    uint64_t pte = r->pte[i] & ~(CDM_PTE_LOCKED | CDM_PTE_MIGRATING);
    if (pte & CDM_PTE_PRESENT)
        pte_set(m, r, i, pte);
    else
        r->pte[i] = 0;
}

int64_t cdm_migrate_collect(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                            uint64_t n, int target, int flags, uint64_t from_pools,
                            uint64_t *src, int32_t *status)
{
    int64_t collected = 0;
    int alloc_absent = flags & CDM_COLLECT_ALLOC_ABSENT;
    machine_lock(m);
    for (uint64_t k = 0; k < n; k++) {
        uint64_t i = first + k;
        int inside = range_page(r, first, k);
        uint64_t pte = inside ? r->pte[i] : 0;
        src[k] = pte;
        if (!inside)
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
    machine_unlock(m);
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
    machine_lock(m);
    for (uint64_t k = 0; k < n; k++) {
        if (status[k] != CDM_MIG_MOVE && status[k] != CDM_MIG_ALLOC)
            continue;
        uint64_t i = first + k;
        if (!range_page(r, first, k)
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
    machine_unlock(m);
    return locked;
}

int64_t cdm_migrate_alloc(struct cdm_machine *m, int target, uint64_t n,
                          int32_t *status, uint64_t *dst)
{
    int64_t got = 0;
    machine_lock(m);
    struct cdm_pool *p = pool_valid(m, target) ? &m->pools[target] : NULL;
    for (uint64_t k = 0; k < n; k++) {
        dst[k] = 0;
        if (status[k] != CDM_MIG_MOVE && status[k] != CDM_MIG_ALLOC)
            continue;
        if (!p) {
            status[k] = -EINVAL;    /* no such pool */
            continue;
        }
        int64_t f = frame_alloc(m, p, status[k] == CDM_MIG_ALLOC);
        if (f < 0) {
            status[k] = -ENOMEM;
            continue;
        }
        dst[k] = p->base_pfn + (uint64_t)f;
        p->nr_held++;       /* owned by its page from finalize on */
        /* alloc_migration_target(): the target node is the preferred one
         * and the only one allowed (__GFP_THISNODE), the migrating CPU's
         * node the local one. */
        numa_count(m, target, target, m->cpu_pool);
        got++;
    }
    machine_unlock(m);
    return got;
}

int64_t cdm_migrate_alloc_plan(struct cdm_machine *m, uint64_t first, uint64_t n,
                               const struct cdm_plan *plan, int32_t *status, uint64_t *dst)
{
    int64_t got = 0;
    machine_lock(m);
    for (uint64_t k = 0; k < n; k++) {
        dst[k] = 0;
        if (status[k] != CDM_MIG_MOVE && status[k] != CDM_MIG_ALLOC)
            continue;
        int intended = plan->table[(first + k) % plan->ntable];
        const int32_t *row = plan->fallback + (size_t)intended * CDM_MAX_POOLS;
        int64_t f = -1;
        int pool = -1;
        for (int j = 0; j < CDM_MAX_POOLS && row[j] >= 0 && f < 0; j++) {
            pool = row[j];
            f = frame_alloc(m, &m->pools[pool], status[k] == CDM_MIG_ALLOC);
        }
        if (f < 0) {
            status[k] = -ENOMEM;
            continue;
        }
        struct cdm_pool *p = &m->pools[pool];
        dst[k] = p->base_pfn + (uint64_t)f;
        p->nr_held++;       /* owned by its page from finalize on */
        numa_account(m, first + k, pool, plan);
        got++;
    }
    machine_unlock(m);
    return got;
}

void cdm_copy_frames(struct cdm_machine *m, const uint64_t *src, const uint64_t *dst, uint64_t n)
{
    machine_lock(m);
    for (uint64_t k = 0; k < n; k++) {
        if (!src[k] || !dst[k])
            continue;
        uint8_t *s = pfn_addr(m, src[k]);
        uint8_t *d = pfn_addr(m, dst[k]);
        if (s && d)
            memcpy(d, s, PAGE);
    }
    machine_unlock(m);
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
    /* Under m->lock, as every write of a frame: the pages are LOCKED, so no
     * access reads the target before finalize; a page truncated meanwhile had
     * its source freed and finalize throws its copy away.  Runs of
     * consecutive frames are copied as one memcpy. */
    uint64_t k = 0;
    machine_lock(m);
    while (k < n) {
        /* Only into frames the migration holds and from frames that exist:
         * a bad dst (finalize then fails its page with -EINVAL) must not
         * overwrite a page's data, or memory outside every pool. */
        int dpool = status[k] == CDM_MIG_MOVE ? held_frame_pool(m, dst[k]) : -1;
        if (dpool < 0 || !src_valid(m, src[k])) {
            k++;
            continue;
        }
        uint64_t run = 1;
        while (k + run < n && status[k + run] == CDM_MIG_MOVE
               && pte_pfn(src[k + run]) == pte_pfn(src[k]) + run
               && pte_pool(src[k + run]) == pte_pool(src[k])
               && dst[k + run] == dst[k] + run
               && src_valid(m, src[k + run]) && held_frame_pool(m, dst[k + run]) == dpool)
            run++;
        copy_frames(pfn_addr(m, dst[k]), frame_addr(m, src[k]), run * PAGE);
        k += run;
    }
    machine_unlock(m);
}

int64_t cdm_migrate_finalize(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                             uint64_t n, int target, const uint64_t *dst, int32_t *status)
{
    int64_t moved = 0;
    machine_lock(m);
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
            /* A page that could have moved and did not (no target frame,
             * pinned or held) is a failure, as migrate_pages() counts one;
             * absent, poisoned and already-placed pages are not candidates. */
            if ((st == -ENOMEM || st == -EBUSY) && range_page(r, first, k)
                && (r->pte[i] & CDM_PTE_PRESENT))
                m->pools[pte_pool(r->pte[i])].counters[CDM_PGMIGRATE_FAIL]++;
            if (st == -ENOMEM && range_page(r, first, k) && (r->pte[i] & CDM_PTE_LOCKED))
                page_unlock(m, r, i);
            continue;
        }
        uint64_t old = range_page(r, first, k) ? r->pte[i] : 0;
        int tpool = held_frame_pool(m, dst[k]);
        if (tpool < 0 || (target >= 0 && tpool != target)) {
            /* Not a frame cdm_migrate_alloc gave this migration on target:
             * the page stays where it is, unlocked.  A held frame of another
             * pool goes back to it; any other dst (free, a page's, outside
             * every pool, a duplicate an earlier page took) is not ours to
             * free. */
            if (tpool >= 0) {
                struct cdm_pool *op = &m->pools[tpool];
                op->nr_held--;
                frame_free(m, op, dst[k] - op->base_pfn);
            }
            if (old & CDM_PTE_LOCKED)
                page_unlock(m, r, i);
            status[k] = -EINVAL;
            continue;
        }
        struct cdm_pool *tp = &m->pools[tpool];
        tp->nr_held--;      /* the target gets its page, or is freed */
        if (!(old & CDM_PTE_LOCKED)) {
            /* Truncated during the copy: its source frame was freed with it;
             * give the target frame back. */
            frame_free(m, tp, dst[k] - tp->base_pfn);
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
            frame_free(m, sp, pte_pfn(old) - sp->base_pfn);
            sp->counters[CDM_PGMIGRATE_SUCCESS]++;
        } else {
            r->pte[i] = 0;
            pte_set(m, r, i, make_pte(m, tpool, dst[k]));
        }
        status[k] = CDM_MIG_DONE;
        moved++;
    }
    machine_unlock(m);
    return moved;
}

void cdm_migrate_abort(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                       uint64_t n, const uint64_t *dst, int32_t *status)
{
    machine_lock(m);
    for (uint64_t k = 0; k < n; k++) {
        if (status[k] != CDM_MIG_MOVE && status[k] != CDM_MIG_ALLOC)
            continue;
        uint64_t i = first + k;
        if (dst && dst[k]) {
            /* Only a frame the migration holds: see held_frame_pool. */
            int tpool = held_frame_pool(m, dst[k]);
            if (tpool >= 0) {
                m->pools[tpool].nr_held--;
                frame_free(m, &m->pools[tpool], dst[k] - m->pools[tpool].base_pfn);
            }
        }
        if (range_page(r, first, k) && (r->pte[i] & (CDM_PTE_LOCKED | CDM_PTE_MIGRATING)))
            page_unlock(m, r, i);
        status[k] = -EINTR;
    }
    machine_unlock(m);
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

/* ------------------------------------------------------- the fault-back log */

struct cdm_faultback_log {
    uint64_t head, count;   /* oldest entry, entries held */
    struct cdm_faultback entry[CDM_FAULTBACK_LOG];
};

int faultback_room(struct cdm_machine *m, uint64_t entries)
{
    if (!m->faultbacks && !(m->faultbacks = calloc(1, sizeof(*m->faultbacks))))
        return 0;
    return CDM_FAULTBACK_LOG - m->faultbacks->count >= entries;
}

void faultback_log(struct cdm_machine *m, uint32_t region, int pool, int to, uint64_t first, uint64_t n,
                   uint64_t moved)
{
    struct cdm_faultback_log *l = m->faultbacks;
    struct cdm_faultback *e = &l->entry[(l->head + l->count++) % CDM_FAULTBACK_LOG];
    e->region = region;
    e->pool = pool;
    e->first = first;
    e->n = n;
    e->moved = moved;
    e->to = to;
}

uint64_t cdm_machine_take_faultbacks(struct cdm_machine *m, struct cdm_faultback *out,
                                     uint64_t max)
{
    uint64_t k = 0;
    machine_lock(m);
    struct cdm_faultback_log *l = m->faultbacks;
    for (; l && l->count && k < max; k++) {
        out[k] = l->entry[l->head];
        l->head = (l->head + 1) % CDM_FAULTBACK_LOG;
        l->count--;
    }
    machine_unlock(m);
    return k;
}

void machine_faultbacks_free(struct cdm_machine *m)
{
    free(m->faultbacks);
    m->faultbacks = NULL;
}

uint64_t cdm_migrate_places(struct cdm_machine *m, const uint64_t *src, const uint64_t *dst,
                            const int32_t *status, uint64_t n, uint64_t *from, uint64_t *to)
{
    uint64_t f = 0, t = 0, holes = 0;
    machine_lock(m);
    for (uint64_t k = 0; k < n; k++) {
        holes += status[k] < 0;
        if (status[k] != CDM_MIG_DONE)
            continue;
        if (src[k] & CDM_PTE_PRESENT)
            f |= 1ULL << pte_pool(src[k]);
        int pool = pfn_pool(m, dst[k]);
        if (pool >= 0)
            t |= 1ULL << pool;
    }
    machine_unlock(m);
    *from = f;
    *to = t;
    return holes;
}
