/*
 * pattern — a CPU workload on a region's data file, through a MAP_SHARED mapping.
 *
 *   pattern write  FILE PAGES SEED [COUNT]  store a pattern into COUNT random pages
 *   pattern verify FILE PAGES SEED [COUNT]  check those pages (and that the others are zero)
 *   pattern touch  FILE PAGES               store one byte into every page, in order
 *
 * Pages are chosen by a seeded permutation; madvise(MADV_RANDOM) makes every
 * page its own fault.  Each page is filled with bytes derived from (seed, page)
 * so a misplaced or stale page is detected.  Exit 0 ok, 2 on a mismatch.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t rng;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static void fill(uint8_t *p, uint64_t seed, uint64_t page)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ULL + page + 1;
    for (int i = 0; i < PAGE; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: pattern write|verify|touch FILE PAGES [SEED [COUNT]]\n");
        return 1;
    }
    const char *mode = argv[1];
    uint64_t pages = strtoull(argv[3], 0, 0);
    uint64_t seed = argc > 4 ? strtoull(argv[4], 0, 0) : 1;
    uint64_t count = argc > 5 ? strtoull(argv[5], 0, 0) : pages;
    int fd = open(argv[2], O_RDWR);
    if (fd < 0) { perror("open"); return 1; }
    uint8_t *m = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 1; }
    madvise(m, pages * PAGE, MADV_RANDOM);

    if (!strcmp(mode, "touch")) {
        for (uint64_t i = 0; i < pages; i++)
            m[i * PAGE] = 1;
        munmap(m, pages * PAGE);
        return 0;
    }
    /* A seeded permutation of the pages; the first COUNT are "chosen". */
    uint64_t *perm = malloc(pages * sizeof(*perm));
    uint8_t *chosen = calloc(pages, 1);
    for (uint64_t i = 0; i < pages; i++) perm[i] = i;
    rng = seed * 2654435761ULL + 88172645463325252ULL;
    for (uint64_t i = pages - 1; i > 0; i--) {
        uint64_t j = next() % (i + 1), t = perm[i];
        perm[i] = perm[j]; perm[j] = t;
    }
    for (uint64_t i = 0; i < count; i++) chosen[perm[i]] = 1;

    uint8_t want[PAGE], zero[PAGE] = {0};
    int bad = 0;
    for (uint64_t k = 0; k < pages; k++) {
        uint64_t i = perm[k];
        if (!strcmp(mode, "write")) {
            if (!chosen[i]) continue;
            fill(want, seed, i);
            memcpy(m + i * PAGE, want, PAGE);
        } else {
            const uint8_t *expect = zero;
            if (chosen[i]) { fill(want, seed, i); expect = want; }
            if (memcmp(m + i * PAGE, expect, PAGE)) {
                if (bad++ < 5) fprintf(stderr, "page %llu differs\n", (unsigned long long)i);
            }
        }
    }
    if (!strcmp(mode, "write") && msync(m, pages * PAGE, MS_SYNC)) { perror("msync"); return 1; }
    munmap(m, pages * PAGE);
    if (bad) { fprintf(stderr, "%d pages differ\n", bad); return 2; }
    return 0;
}
