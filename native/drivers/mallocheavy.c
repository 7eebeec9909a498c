/*
 * mallocheavy — a malloc-heavy workload for `cdmfs run` against plain.
 *
 *   mallocheavy MIB
 *
 * Allocates MIB MiB in a mix that stresses an allocator: half in 250 000
 * small blocks (16 B .. 1 KiB) and half in large blocks of 64 KiB .. 4 MiB,
 * each written once, none freed until the end; then frees them all.
 * Prints "bytes SECONDS" (allocation and first write only) on stdout.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: mallocheavy MIB\n");
        return 1;
    }
    size_t total = strtoull(argv[1], 0, 0) << 20, small_budget = total / 2, done = 0;
    size_t cap = 1 << 20, n = 0;
    char **blocks = calloc(cap, sizeof *blocks);
    unsigned seed = 12345;
    double t0 = now();
    for (size_t used = 0; used < small_budget && n < cap;) {
        size_t sz = 16 + rand_r(&seed) % 1009;
        char *p = malloc(sz);
        memset(p, (int)n, sz);
        blocks[n++] = p;
        used += sz;
        done += sz;
    }
    for (size_t used = 0; used < total - small_budget && n < cap;) {
        size_t sz = (size_t)(64 << 10) << (rand_r(&seed) % 7);        /* 64 KiB .. 4 MiB */
        char *p = malloc(sz);
        memset(p, (int)n, sz);
        blocks[n++] = p;
        used += sz;
        done += sz;
    }
    double t1 = now();
    for (size_t i = 0; i < n; i++)
        free(blocks[i]);
    free(blocks);
    printf("%zu %.3f\n", done, t1 - t0);
    return 0;
}
