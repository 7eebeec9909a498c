/*
 * core_race — the native core built with ThreadSanitizer, two threads at once
 * on entry points that look up pools while another thread adds pools.
 *
 *   core_race
 *
 * Links the core's sources directly (the test compiles them with
 * -fsanitize=thread); ThreadSanitizer prints a report for every data race it
 * sees.  Thread A adds pools; the main thread looks PFNs of those pools up
 * (census, owner, retire/unretire, lookups), which read the number of pools
 * and the pools it counts: they must do so under the machine's mutex.  Then
 * thread B writes, truncates and grows a region while the main thread takes
 * snapshots of its pool and of the region, as sysfs reads do.
 * Prints "found N" (lookups that found their pool) and exits 0.
 */
#include "cdmcore.h"

#include <pthread.h>
#include <stdio.h>

#define POOLS 60

static struct cdm_machine *m;

static uint64_t base_of(int i) { return 0x100000 + (uint64_t)i * 0x10000; }

static void *adder(void *arg)
{
    (void)arg;
    for (int i = 0; i < POOLS; i++)
        cdm_pool_add(m, base_of(i), 1024, 0);
    return NULL;
}

static struct cdm_region *region;

static void *writer(void *arg)
{
    int32_t table[1] = {0}, fallback[CDM_MAX_POOLS * CDM_MAX_POOLS];
    for (int k = 0; k < CDM_MAX_POOLS * CDM_MAX_POOLS; k++)
        fallback[k] = -1;
    fallback[0] = 0;
    struct cdm_plan plan = {.local = 0, .ntable = 1, .table = table, .fallback = fallback};
    struct cdm_rw_result res;
    static uint8_t buf[16 * 4096];
    (void)arg;
    for (int k = 0; k < 2000; k++) {
        buf[k % sizeof(buf)] = (uint8_t)k;
        cdm_region_truncate(m, region, sizeof(buf));
        cdm_region_rw(m, region, 0, sizeof(buf), buf, 1, 1, &plan, &res);
        cdm_region_truncate(m, region, 3 * 4096 + 100);
    }
    return NULL;
}

int main(void)
{
    m = cdm_machine_new();
    pthread_t t;
    pthread_create(&t, NULL, adder, NULL);
    uint64_t out[2], found = 0;
    for (int k = 0; k < 20000; k++) {
        uint64_t pfn = base_of(k % POOLS) + 5;
        uint32_t region;
        uint64_t page;
        cdm_frames_census(m, pfn, 10, out);
        found += cdm_pfn_pool(m, pfn) >= 0;
        cdm_pfn_owner(m, pfn, &region, &page);
        if (cdm_frame_retire(m, pfn, 0) == 0)
            cdm_frames_unretire(m, pfn, 1);
        cdm_pool_free_pages(m, k % POOLS);
    }
    pthread_join(t, NULL);

    region = cdm_region_new(m, 0);
    pthread_create(&t, NULL, writer, NULL);
    struct cdm_pool_stats ps;
    struct cdm_region_stats rs;
    for (int k = 0; k < 20000; k++) {
        cdm_pool_snapshot(m, 0, &ps);
        cdm_region_snapshot(m, region, &rs);
        /* Each snapshot agrees with itself (two calls need not agree). */
        if (ps.nr_free + ps.nr_used + ps.nr_retired != ps.npages
            || rs.npages != (rs.size + 4095) / 4096 || rs.resident[0] > rs.npages)
            printf("inconsistent snapshot\n");
    }
    pthread_join(t, NULL);
    cdm_region_free(m, region);
    printf("found %llu\n", (unsigned long long)found);
    cdm_machine_free(m);
    return 0;
}
