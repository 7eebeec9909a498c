/* pagetable.c — a region's page table and its populated index: resize/free,
 * gather/scatter (cdm_region_rw) with first touch by plan, and the walks over
 * a range (the kernel's mm/memory.c and mm/pagewalk.c). */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* ------------------------------------------------------ populated index */

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
int next_populated_span(const struct cdm_region *r, uint64_t from, uint64_t end,
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
        frame_free(m, &m->pools[pte_pool(pte)], pte_pfn(pte) - m->pools[pte_pool(pte)].base_pfn);
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

/* The size of r becomes size bytes (see cdm_region_truncate).  Caller holds
 * m->lock. */
static int region_truncate(struct cdm_machine *m, struct cdm_region *r, uint64_t size)
{
    uint64_t npages = (size >> CDM_PAGE_SHIFT) + ((size & (PAGE - 1)) != 0);
    if (npages > CDM_REGION_MAX_PAGES)
        return -EINVAL;
    /* The bytes below keep stay; the rest of the page keep falls in (a page
     * that stays, shrinking or growing) must read zero. */
    uint64_t keep = size < r->size ? size : r->size;
    uint64_t tail = keep >> CDM_PAGE_SHIFT, from = keep & (PAGE - 1);
    if (from && tail < r->npages && (r->pte[tail] & CDM_PTE_LOCKED))
        return -EAGAIN;     /* checked first: a failed call changes nothing */
    if (npages > r->cap) {
        /* Reserve generously: entries cost host memory only once written. */
        uint64_t cap = r->cap ? r->cap : 1024;
        while (cap < npages)
            cap *= 2;       /* no wrap: npages is at most 2^40 */
        if (region_reserve(r, cap) < 0)
            return -ENOMEM;
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
    r->size = size;
    /* The chunk the new end cuts: its mark may only hold for pages now gone. */
    if (npages < old_npages && npages % CHUNK)
        chunk_settle(r, npages >> CHUNK_SHIFT);
    /* Under the lock, as every write of a frame.  A collected page that is
     * not locked yet is zeroed where it is: its copy is taken after the
     * lock step.  Device-private frames included (see cdmcore.h). */
    if (from && tail < old_npages && (r->pte[tail] & CDM_PTE_PRESENT))
        memset(frame_addr(m, r->pte[tail]) + from, 0, PAGE - from);
    return 0;
}

int cdm_region_truncate(struct cdm_machine *m, struct cdm_region *r, uint64_t size)
{
    machine_lock(m);
    int ret = region_truncate(m, r, size);
    machine_unlock(m);
    return ret;
}

int cdm_region_resize(struct cdm_machine *m, struct cdm_region *r, uint64_t npages)
{
    if (npages > CDM_REGION_MAX_PAGES)
        return -EINVAL;
    return cdm_region_truncate(m, r, npages << CDM_PAGE_SHIFT);
}

void cdm_region_snapshot(struct cdm_machine *m, struct cdm_region *r, struct cdm_region_stats *out)
{
    machine_lock(m);
    out->size = r->size;
    out->npages = r->npages;
    out->nr_pinned = r->nr_pinned;
    out->nr_poisoned = r->nr_poisoned;
    memcpy(out->resident, r->resident, sizeof(out->resident));
    out->served_reads = r->served_reads;
    out->served_writes = r->served_writes;
    out->nr_duplicated = r->nr_duplicated;
    machine_unlock(m);
}

void cdm_region_free(struct cdm_machine *m, struct cdm_region *r)
{
    cdm_region_resize(m, r, 0);
    if (r->pte) {
        munmap(r->pte, pte_bytes(r->cap));
        munmap(r->chunks, chunks_bytes(r->cap));
        munmap(r->summary, summary_bytes(r->cap));
    }
    region_policies_free(r->policies);
    free(r);
}

void cdm_region_ptes(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                     uint64_t n, uint64_t *out)
{
    memset(out, 0, n * sizeof(*out));
    uint64_t lo, hi;
    machine_lock(m);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi)
        memcpy(out + (lo - first), r->pte + lo, (hi - lo) * sizeof(*out));
    machine_unlock(m);
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
        int64_t f = frame_alloc(m, p, 1);
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

/* The copy of a gather/scatter whose pages [off, off + len) are all present:
 * the bytes, the entry flags (dirty, CPU-mapped) and the counters (one
 * pgfault per READ; the NUMA events of pages this call allocated, marked
 * PTE_NEW, by plan).  Caller holds m->lock. */
static void copy_pages(struct cdm_machine *m, struct cdm_region *r, uint64_t off, uint64_t len,
                       uint8_t *buf, int write, int mark_cpu, const struct cdm_plan *plan)
{
    uint64_t first = off >> CDM_PAGE_SHIFT;
    uint64_t last = (off + len - 1) >> CDM_PAGE_SHIFT;
    for (uint64_t i = first; i <= last; i++) {
        uint64_t pte = r->pte[i];
        uint64_t pstart = i << CDM_PAGE_SHIFT;
        uint64_t from = off > pstart ? off - pstart : 0;
        uint64_t to = off + len < pstart + PAGE ? off + len - pstart : PAGE;
        uint8_t *b = buf + (pstart + from - off);
        if (write) {
            memcpy(frame_addr(m, pte) + from, b, to - from);
            pte |= CDM_PTE_DIRTY;
        } else {
            /* A page this call placed is zero (frame_alloc): reading the
             * frame would only cost the host a page fault on it. */
            if (pte & PTE_NEW)
                memset(b, 0, to - from);
            else
                memcpy(b, frame_addr(m, pte) + from, to - from);
            /* One fault per READ, however many pages its readahead brings. */
            if (i == first)
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
}

int cdm_region_rw(struct cdm_machine *m, struct cdm_region *r, uint64_t off, uint64_t len,
                  uint8_t *buf, int write, int mark_cpu, const struct cdm_plan *plan,
                  struct cdm_rw_result *res)
{
    res->allocated = 0;
    res->page = 0;
    if (len == 0)
        return 0;
    if (len > UINT64_MAX - off) {
        res->page = off >> CDM_PAGE_SHIFT;  /* the range wraps around: no such bytes */
        return -EINVAL;
    }
    uint64_t first = off >> CDM_PAGE_SHIFT;
    uint64_t last = (off + len - 1) >> CDM_PAGE_SHIFT;
    int ret = 0;

    machine_lock(m);
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
    copy_pages(m, r, off, len, buf, write, mark_cpu, plan);
out:
    machine_unlock(m);
    return ret;
}

/* Pages of one READ or WRITE the router faults back from device memory. */
#define FAULTBACK_MAX 256

/* The migrate_to_ram() of a router's READ or WRITE: every device-private
 * page of [first, last] gets a frame by plan (its first touch's), all or
 * nothing: 0, or -ENOSPC with nothing taken.  new[k] is the entry for page
 * first + k (0: not private).  Caller holds m->lock. */
static int faultback_alloc(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                           uint64_t last, const struct cdm_plan *plan, uint64_t *new)
{
    for (uint64_t i = first; i <= last; i++) {
        new[i - first] = 0;
        if (!(r->pte[i] & CDM_PTE_PRIVATE))
            continue;
        uint64_t pte = plan_alloc(m, r, i, plan);
        if (!pte) {
            for (uint64_t j = i; j-- > first;)
                if (new[j - first]) {
                    struct cdm_pool *p = &m->pools[pte_pool(new[j - first])];
                    frame_unalloc(p, pte_pfn(new[j - first]) - p->base_pfn);
                }
            return -ENOSPC;
        }
        new[i - first] = pte;
    }
    return 0;
}

/* Moves the private pages to the frames faultback_alloc gave them: bytes,
 * the page's own flags (pinned, dirty), the source frame freed and counted
 * as a migration, the NUMA events of the new frame, and one
 * entry per source pool in the log Python applies (devices' mirrors and
 * counters).  Caller holds m->lock. */
static void faultback_commit(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                             uint64_t last, const uint64_t *new, const struct cdm_plan *plan)
{
    uint64_t moved[CDM_MAX_POOLS] = {0};
    int to = -1;
    for (uint64_t i = first; i <= last; i++) {
        uint64_t pte = new[i - first], old = r->pte[i];
        if (!pte)
            continue;
        memcpy(frame_addr(m, pte), frame_addr(m, old), PAGE);
        struct cdm_pool *sp = &m->pools[pte_pool(old)];
        pte_set(m, r, i, pte | (old & (CDM_PTE_PINNED | CDM_PTE_DIRTY)));
        numa_account(m, i, pte_pool(pte), plan);
        frame_free(m, sp, pte_pfn(old) - sp->base_pfn);
        sp->counters[CDM_PGMIGRATE_SUCCESS]++;
        moved[pte_pool(old)]++;
        if (to < 0)
            to = pte_pool(pte);
    }
    for (int pool = 0; pool < m->npools; pool++)
        if (moved[pool])
            faultback_log(m, r->id, pool, to, first, last - first + 1, moved[pool]);
}

int64_t cdm_region_serve(struct cdm_machine *m, struct cdm_region *r, uint64_t off, uint64_t len,
                         uint8_t *buf, int write, int32_t local, uint32_t pid)
{
    if (len == 0 || len > UINT64_MAX - off)
        return -EAGAIN;
    int64_t ret = -EAGAIN;
    machine_lock(m);
    if (off >= r->size)
        goto out;
    if (len > r->size - off) {
        if (write)
            goto out;           /* grows the file */
        len = r->size - off;
    }
    uint64_t first = off >> CDM_PAGE_SHIFT;
    uint64_t last = (off + len - 1) >> CDM_PAGE_SHIFT;
    int absent = 0, private = 0;
    for (uint64_t i = first; i <= last; i++) {
        uint64_t pte = r->pte[i];
        if (!pte) {
            absent = 1;
            continue;
        }
        if ((pte & (CDM_PTE_PRESENT | CDM_PTE_POISONED | CDM_PTE_LOCKED)) != CDM_PTE_PRESENT)
            goto out;
        if (!write && (pte & CDM_PTE_NUMA))
            goto out;           /* a NUMA hinting fault: Python's */
        /* A device's read-only duplicate: Python collapses it first. */
        if (write && (pte & CDM_PTE_DUPLICATED))
            goto out;
        if (pte & CDM_PTE_PRIVATE) {
            /* Pinned, or collected by a migration (which the fault-back
             * takes over): Python's. */
            if (pte & (CDM_PTE_PINNED | CDM_PTE_MIGRATING))
                goto out;
            private = 1;
        }
    }
    const struct cdm_plan *plan = NULL;
    uint64_t new[FAULTBACK_MAX];
    if (absent || private) {
        if (local < 0) {
            ret = -ENXIO;
            goto out;
        }
        plan = fault_plan(m, r, first, last, local);
        if (!plan)
            goto out;
        if (private && (last - first >= FAULTBACK_MAX || !faultback_room(m, m->npools)
                        || faultback_alloc(m, r, first, last, plan, new)))
            goto out;
        struct cdm_rw_result res = {0, 0};
        if (absent && alloc_absent(m, r, first, last + 1, plan, &res)) {
            if (private)
                for (uint64_t i = last + 1; i-- > first;)
                    if (new[i - first]) {
                        struct cdm_pool *p = &m->pools[pte_pool(new[i - first])];
                        frame_unalloc(p, pte_pfn(new[i - first]) - p->base_pfn);
                    }
            goto out;
        }
        if (private)
            faultback_commit(m, r, first, last, new, plan);
    }
    copy_pages(m, r, off, len, buf, write, 1, plan);
    if (write)
        r->served_writes++;
    else
        r->served_reads++;
    if (m->trace_mask) {
        uint32_t kind = write ? CDM_TRACE_WRITEBACK
                      : private ? CDM_TRACE_FAULT_BACK : absent ? CDM_TRACE_FIRST_TOUCH : CDM_TRACE_FAULT;
        if (m->trace_mask & (1u << kind))
            trace_record(m, kind, r->id, pid, pte_pool(r->pte[first]), first, last - first + 1);
    }
    ret = (int64_t)len;
out:
    machine_unlock(m);
    return ret;
}

void cdm_region_uncache(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n)
{
    uint64_t lo, hi;
    machine_lock(m);
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
    machine_unlock(m);
}

int cdm_region_populate(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                        uint64_t n, const struct cdm_plan *plan, struct cdm_rw_result *res)
{
    res->allocated = 0;
    res->page = 0;
    int ret = 0;
    machine_lock(m);
    if (!range_inside(r, first, n)) {
        res->page = first > r->npages ? first : r->npages;     /* the first page missing */
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
    machine_unlock(m);
    return ret;
}

uint64_t cdm_region_count(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                          uint64_t n, uint64_t flag)
{
    uint64_t c = 0, lo, hi;
    machine_lock(m);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            seen |= r->pte[i];
            c += (r->pte[i] & flag) != 0;
        }
        span_settle(r, lo, hi, seen);
    }
    machine_unlock(m);
    return c;
}

uint64_t cdm_region_next_present(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                 uint64_t end)
{
    uint64_t found = end, lo, hi;
    machine_lock(m);
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
    machine_unlock(m);
    return found;
}

uint64_t cdm_region_next_absent(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                uint64_t end)
{
    uint64_t lo, hi;
    machine_lock(m);
    uint64_t stop = end < r->npages ? end : r->npages;
    uint64_t x = first;
    /* A stretch the index does not mark is all zero: x itself, unless it
     * lies in a marked chunk whose entries are all set. */
    while (x < stop && next_populated_span(r, x, stop, &lo, &hi) && lo == x) {
        uint64_t i = lo;
        while (i < hi && r->pte[i])
            i++;
        x = i;
        if (i < hi)
            break;
    }
    machine_unlock(m);
    return x < stop ? x : stop;
}

/* Zeroes bytes [from, to) of page i if it has a frame.  Caller holds m->lock. */
static void page_zero(struct cdm_machine *m, struct cdm_region *r, uint64_t i,
                      uint64_t from, uint64_t to)
{
    if (r->pte[i] & CDM_PTE_PRESENT)
        memset(frame_addr(m, r->pte[i]) + from, 0, to - from);
}

int cdm_region_punch(struct cdm_machine *m, struct cdm_region *r, uint64_t off, uint64_t len)
{
    int ret = 0;
    machine_lock(m);
    uint64_t end = off + len < off || off + len > r->size ? r->size : off + len;
    if (off >= end)
        goto out;
    uint64_t pfirst = off >> CDM_PAGE_SHIFT, pend = (end + PAGE - 1) >> CDM_PAGE_SHIFT;
    /* Whole pages [first, last); the edges (partial pages) get zeroed. */
    uint64_t first = (off + PAGE - 1) >> CDM_PAGE_SHIFT, last = end >> CDM_PAGE_SHIFT;
    if (end == r->size)
        last = pend;     /* the file's last page, cut by its end: whole as far as it goes */
    uint64_t lo, hi;
    for (uint64_t x = pfirst; next_populated_span(r, x, pend, &lo, &hi); x = hi)
        for (uint64_t i = lo; i < hi; i++)
            if (r->pte[i] & (CDM_PTE_LOCKED | CDM_PTE_MIGRATING)) {
                ret = -EAGAIN;      /* checked first: a failed call changes nothing */
                goto out;
            }
    if (first > last) {
        /* Inside one page. */
        page_zero(m, r, pfirst, off & (PAGE - 1), end - (pfirst << CDM_PAGE_SHIFT));
        goto out;
    }
    if (pfirst < first)
        page_zero(m, r, pfirst, off & (PAGE - 1), PAGE);
    if (last < pend)
        page_zero(m, r, last, 0, end & (PAGE - 1));
    /* Last page first, as truncation frees (see region_truncate). */
    for (uint64_t to = last; prev_populated_span(r, first, to, &lo, &hi); to = lo) {
        for (uint64_t i = hi; i-- > lo;)
            if (r->pte[i])
                page_release(m, r, i);
        chunk_settle(r, lo >> CHUNK_SHIFT);   /* the edges' pages may still hold it */
    }
out:
    machine_unlock(m);
    return ret;
}

uint64_t cdm_region_flag_runs(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                              uint64_t n, uint64_t flag, uint64_t *run_first, uint64_t *run_len,
                              uint64_t max, uint64_t *next)
{
    uint64_t runs = 0, lo, hi;
    machine_lock(m);
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
    machine_unlock(m);
    return runs;
}

uint64_t cdm_region_mirror_pool(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                                uint64_t n, int pool, uint8_t *mirror, uint8_t value)
{
    uint64_t c = 0, lo, hi;
    machine_lock(m);
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
    machine_unlock(m);
    return c;
}

/* ---------------------------------------------------------- introspection */

void cdm_region_census(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                       uint64_t *present, uint64_t *dirty)
{
    uint64_t lo, hi;
    machine_lock(m);
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
    machine_unlock(m);
}

void cdm_region_pagemap(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                        uint64_t *out, int show_pfn)
{
    /* The frame field, PFN or swap type and offset, only to the privileged,
     * as the kernel writes it only with show_pfn. */
    uint64_t frame_mask = show_pfn ? CDM_PM_PFN_MASK : 0;
    /* Pages in chunks never populated (and beyond the end) read as never touched. */
    memset(out, 0, n * sizeof(*out));
    uint64_t lo, hi;
    machine_lock(m);
    uint64_t end = walk_end(r, first, n);
    for (uint64_t x = first; next_populated_span(r, x, end, &lo, &hi); x = hi) {
        uint64_t seen = 0;
        for (uint64_t i = lo; i < hi; i++) {
            uint64_t pte = r->pte[i];
            seen |= pte;
            if (!(pte & (CDM_PTE_PRESENT | CDM_PTE_POISONED)))
                continue;   /* never touched (a poisoned entry keeps its old PFN) */
            /* pte_to_pagemap_entry() of a private anonymous page mapped
             * once: no PM_FILE (the folio is anon).  Poisoned pages and
             * device-private pages are pfn swap entries to the CPU
             * (make_hwpoison_entry, make_writable_device_private_entry):
             * PM_SWAP, swp_type | PFN << MAX_SWAPFILES_SHIFT, and no
             * PM_MMAP_EXCLUSIVE, which the kernel gives only with PM_PRESENT. */
            uint64_t frame, flags;
            if (pte & CDM_PTE_POISONED) {
                frame = CDM_SWP_HWPOISON | pte_pfn(pte) << CDM_MAX_SWAPFILES_SHIFT;
                flags = CDM_PM_SWAP;
            } else if (pte & CDM_PTE_PRIVATE) {
                frame = CDM_SWP_DEVICE_WRITE | pte_pfn(pte) << CDM_MAX_SWAPFILES_SHIFT;
                flags = CDM_PM_SWAP;
            } else {
                frame = pte_pfn(pte);
                flags = CDM_PM_PRESENT | CDM_PM_MMAP_EXCLUSIVE;
            }
            out[i - first] = (frame & frame_mask) | flags;
        }
        span_settle(r, lo, hi, seen);
    }
    machine_unlock(m);
}

uint64_t cdm_region_misfits(struct cdm_machine *m, struct cdm_region *r, uint64_t first,
                            uint64_t n, const int32_t *table, uint32_t ntable,
                            uint64_t fit_pools, uint64_t skip_pools, uint64_t *run_first,
                            uint64_t *run_len, int32_t *run_pool, uint64_t max, uint64_t *nruns)
{
    uint64_t count = 0, runs = 0, lo, hi;
    machine_lock(m);
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
    machine_unlock(m);
    *nruns = runs;
    return count;
}
