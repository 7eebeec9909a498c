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
 * and the pools it counts: they must do so under the machine's mutex.
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
    printf("found %llu\n", (unsigned long long)found);
    cdm_machine_free(m);
    return 0;
}
