/* trace.c — the core's trace ring: the CPU faults and write-backs the router
 * serves in C, which no Python code sees, kept for Python to turn into trace
 * lines (cdmfs/lib/trace.py).  Off (the default) it costs serve one test of
 * trace_mask; on, one record under the lock serve already holds. */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <time.h>

struct cdm_trace_ring {
    uint64_t head, count;   /* oldest record, records held */
    uint64_t lost;          /* records dropped since the last take: the ring was full */
    struct cdm_trace_rec rec[CDM_TRACE_RING];
};

int cdm_machine_trace(struct cdm_machine *m, uint32_t mask)
{
    int ret = 0;
    machine_lock(m);
    if (mask && !m->trace && !(m->trace = calloc(1, sizeof(*m->trace))))
        ret = -ENOMEM;
    else
        m->trace_mask = mask;
    machine_unlock(m);
    return ret;
}

void trace_record(struct cdm_machine *m, uint32_t kind, uint32_t region, uint32_t pid,
                  int32_t pool, uint64_t first, uint64_t n)
{
    struct cdm_trace_ring *t = m->trace;
    if (t->count == CDM_TRACE_RING) {
        t->lost++;
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    struct cdm_trace_rec *e = &t->rec[(t->head + t->count++) % CDM_TRACE_RING];
    e->ts_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    e->kind = kind;
    e->region = region;
    e->pid = pid;
    e->pool = pool;
    e->first = first;
    e->n = n;
}

uint64_t cdm_machine_take_trace(struct cdm_machine *m, struct cdm_trace_rec *out, uint64_t max,
                                uint64_t *lost)
{
    uint64_t k = 0;
    *lost = 0;
    machine_lock(m);
    struct cdm_trace_ring *t = m->trace;
    if (t) {
        for (; t->count && k < max; k++) {
            out[k] = t->rec[t->head];
            t->head = (t->head + 1) % CDM_TRACE_RING;
            t->count--;
        }
        if (!t->count) {
            *lost = t->lost;
            t->lost = 0;
        }
    }
    machine_unlock(m);
    return k;
}

void machine_trace_free(struct cdm_machine *m)
{
    free(m->trace);
    m->trace = NULL;
}
