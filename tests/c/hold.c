/*
 * hold — writes a pattern through a MAP_SHARED mapping, keeps it dirty in
 * the page cache (no msync), waits, then checks it through the same mapping.
 *
 *   hold FILE PAGES SEED
 *
 * Fills every page as tests/c/pattern.c does (one fault a page:
 * MADV_RANDOM), prints "ready" and waits for a line on stdin; meanwhile the
 * test moves the pages under it.  Then it compares every page with the
 * pattern and prints "ok", or "page N differs" and exits 2.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

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
    if (argc != 4) {
        fprintf(stderr, "usage: hold FILE PAGES SEED\n");
        return 1;
    }
    uint64_t pages = strtoull(argv[2], 0, 0);
    uint64_t seed = strtoull(argv[3], 0, 0);
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) { perror("open"); return 1; }
    uint8_t *m = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 1; }
    madvise(m, pages * PAGE, MADV_RANDOM);
    for (uint64_t i = 0; i < pages; i++)
        fill(m + i * PAGE, seed, i);
    printf("ready\n");
    fflush(stdout);

    char line[64];
    if (!fgets(line, sizeof(line), stdin)) { fprintf(stderr, "no go\n"); return 1; }
    uint8_t want[PAGE];
    int bad = 0;
    for (uint64_t i = 0; i < pages; i++) {
        fill(want, seed, i);
        if (memcmp(m + i * PAGE, want, PAGE)) {
            if (bad++ < 5) printf("page %llu differs\n", (unsigned long long)i);
        }
    }
    if (!bad)
        printf("ok\n");
    fflush(stdout);
    munmap(m, pages * PAGE);
    close(fd);
    return bad ? 2 : 0;
}
