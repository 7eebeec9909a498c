/* mempolicy.c — what a first touch served in C needs to place a page (the
 * kernel's mm/mempolicy.c, the lookup half): copies of the plans Python
 * computed for each policy and faulting node, each region's policy ranges
 * naming them, and the faulting CPU's node.  Python decides every policy;
 * the core only looks its decision up, and says "ask Python" (no plan) when
 * it has none. */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A plan and the arrays it points into, in one allocation. */
struct plan_copy {
    struct cdm_plan plan;
    int32_t arrays[];       /* table[ntable], then fallback[CDM_MAX_POOLS^2] */
};

struct cdm_policies {
    struct plan_copy *plan[CDM_MAX_POLICIES][CDM_MAX_POOLS];   /* [policy][local pool] */
    int32_t *cpu_pool;      /* pool of each CPU's node */
    uint32_t ncpus;
    int32_t only_pool;      /* every CPU on one node: its pool, else -1 */
    int32_t default_pool;   /* a CPU not in cpu_pool */
};

/* The region's policy ranges (cdm_region_set_policies). */
struct cdm_region_policies {
    uint64_t n;
    int32_t default_id;
    uint64_t *start, *end;
    int32_t *id;
};

static struct cdm_policies *policies(struct cdm_machine *m)
{
    if (!m->policies) {
        m->policies = calloc(1, sizeof(*m->policies));
        if (m->policies) {
            m->policies->only_pool = -1;
            m->policies->default_pool = -1;
        }
    }
    return m->policies;
}

int cdm_machine_set_plan(struct cdm_machine *m, int32_t policy, const struct cdm_plan *plan)
{
    if (policy < 0 || policy >= CDM_MAX_POLICIES || !plan->ntable || plan->ntable > 1u << 20)
        return -EINVAL;
    machine_lock(m);
    int ret = -EINVAL;
    if (!pool_valid(m, plan->local))
        goto out;
    for (uint32_t k = 0; k < plan->ntable; k++)
        if (!pool_valid(m, plan->table[k]))
            goto out;
    size_t nfall = (size_t)CDM_MAX_POOLS * CDM_MAX_POOLS;
    for (size_t k = 0; k < nfall; k++)
        if (plan->fallback[k] >= m->npools)
            goto out;
    ret = -ENOMEM;
    struct cdm_policies *t = policies(m);
    struct plan_copy *c = malloc(sizeof(*c) + (plan->ntable + nfall) * sizeof(int32_t));
    if (!t || !c) {
        free(c);
        goto out;
    }
    c->plan = *plan;
    memcpy(c->arrays, plan->table, plan->ntable * sizeof(int32_t));
    memcpy(c->arrays + plan->ntable, plan->fallback, nfall * sizeof(int32_t));
    c->plan.table = c->arrays;
    c->plan.fallback = c->arrays + plan->ntable;
    free(t->plan[policy][plan->local]);
    t->plan[policy][plan->local] = c;
    ret = 0;
out:
    machine_unlock(m);
    return ret;
}

void cdm_machine_clear_plans(struct cdm_machine *m)
{
    machine_lock(m);
    struct cdm_policies *t = m->policies;
    for (int i = 0; t && i < CDM_MAX_POLICIES; i++)
        for (int p = 0; p < CDM_MAX_POOLS; p++) {
            free(t->plan[i][p]);
            t->plan[i][p] = NULL;
        }
    machine_unlock(m);
}

int cdm_machine_set_cpu_nodes(struct cdm_machine *m, int32_t default_pool, uint32_t ncpus,
                              const int32_t *cpu_pool)
{
    int32_t *copy = ncpus ? malloc(ncpus * sizeof(*copy)) : NULL;
    if (ncpus && !copy)
        return -ENOMEM;
    machine_lock(m);
    struct cdm_policies *t = policies(m);
    int ret = t ? 0 : -ENOMEM;
    for (uint32_t k = 0; !ret && k < ncpus; k++)
        if (!pool_valid(m, cpu_pool[k]))
            ret = -EINVAL;
    if (!ret && !pool_valid(m, default_pool))
        ret = -EINVAL;
    if (ret) {
        machine_unlock(m);
        free(copy);
        return ret;
    }
    if (ncpus)
        memcpy(copy, cpu_pool, ncpus * sizeof(*copy));
    free(t->cpu_pool);
    t->cpu_pool = copy;
    t->ncpus = ncpus;
    t->default_pool = default_pool;
    t->only_pool = default_pool;
    for (uint32_t k = 0; k < ncpus; k++)
        if (copy[k] != default_pool)
            t->only_pool = -1;
    machine_unlock(m);
    return 0;
}

/* The CPU pid last ran on: field 39 of /proc/PID/stat (after the command,
 * which may hold spaces and parentheses: count from the last ')'). */
static int last_cpu(int32_t pid)
{
    char path[32], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    p += 2;                 /* ") " then field 3, the state */
    for (int field = 3; field < 39 && *p; p++)
        if (*p == ' ')
            field++;
    return *p ? atoi(p) : -1;
}

int32_t cdm_machine_local_pool(struct cdm_machine *m, int32_t pid)
{
    machine_lock(m);
    struct cdm_policies *t = m->policies;
    int32_t only = t ? t->only_pool : -1, dflt = t ? t->default_pool : -1;
    machine_unlock(m);
    if (only >= 0 || dflt < 0)
        return only;
    /* The read happens outside the lock: it is the host kernel's work. */
    int cpu = last_cpu(pid);
    machine_lock(m);
    int32_t pool = t->default_pool;
    if (cpu >= 0 && (uint32_t)cpu < t->ncpus)
        pool = t->cpu_pool[cpu];
    machine_unlock(m);
    return pool;
}

int cdm_region_set_policies(struct cdm_machine *m, struct cdm_region *r, int32_t default_id,
                            uint64_t n, const uint64_t *start, const uint64_t *end,
                            const int32_t *id)
{
    int ret = 0;
    struct cdm_region_policies *p = calloc(1, sizeof(*p));
    if (p && n) {
        p->start = malloc(n * sizeof(uint64_t));
        p->end = malloc(n * sizeof(uint64_t));
        p->id = malloc(n * sizeof(int32_t));
    }
    if (!p || (n && (!p->start || !p->end || !p->id))) {
        region_policies_free(p);
        p = NULL;
        ret = -ENOMEM;
    }
    for (uint64_t k = 0; p && k < n; k++)
        if (start[k] >= end[k] || (k && start[k] < end[k - 1])) {
            region_policies_free(p);
            p = NULL;
            ret = -EINVAL;
        }
    if (p) {
        p->n = n;
        p->default_id = default_id;
        if (n) {
            memcpy(p->start, start, n * sizeof(uint64_t));
            memcpy(p->end, end, n * sizeof(uint64_t));
            memcpy(p->id, id, n * sizeof(int32_t));
        }
    }
    /* On failure the region has no ranges: Python places its first touches. */
    machine_lock(m);
    struct cdm_region_policies *old = r->policies;
    r->policies = p;
    machine_unlock(m);
    region_policies_free(old);
    return ret;
}

void region_policies_free(struct cdm_region_policies *p)
{
    if (p) {
        free(p->start);
        free(p->end);
        free(p->id);
        free(p);
    }
}

/* The policy placing pages [first, last] of r, if one policy places them all;
 * else (ranges with different policies, a policy Python has not numbered) -1. */
static int32_t policy_of(const struct cdm_region *r, uint64_t first, uint64_t last)
{
    const struct cdm_region_policies *p = r->policies;
    if (!p)
        return -1;
    /* The last range starting at or before first. */
    uint64_t lo = 0, hi = p->n;
    while (lo < hi) {
        uint64_t mid = (lo + hi) / 2;
        if (p->start[mid] <= first)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo > 0 && first < p->end[lo - 1])           /* inside range lo - 1 */
        return last < p->end[lo - 1] ? p->id[lo - 1] : -1;
    /* In a gap: the region's policy, up to the next range. */
    if (lo < p->n && last >= p->start[lo])
        return -1;
    return p->default_id;
}

const struct cdm_plan *fault_plan(struct cdm_machine *m, const struct cdm_region *r,
                                  uint64_t first, uint64_t last, int32_t local)
{
    int32_t id = policy_of(r, first, last);
    if (id < 0 || id >= CDM_MAX_POLICIES || !m->policies || !pool_valid(m, local))
        return NULL;
    struct plan_copy *c = m->policies->plan[id][local];
    return c ? &c->plan : NULL;
}

void machine_policies_free(struct cdm_machine *m)
{
    struct cdm_policies *t = m->policies;
    if (!t)
        return;
    for (int i = 0; i < CDM_MAX_POLICIES; i++)
        for (int p = 0; p < CDM_MAX_POOLS; p++)
            free(t->plan[i][p]);
    free(t->cpu_pool);
    free(t);
    m->policies = NULL;
}
