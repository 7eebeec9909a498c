/*
 * firsttouch — CPU first-touch rate of a file through a MAP_SHARED mapping.
 *
 *   firsttouch FILE BYTES random|seq
 *
 * random: one store into every page in a shuffled order, madvise(MADV_RANDOM)
 * so every page is its own fault; seq: pages in order with the kernel's
 * read-ahead.  Prints "pages SECONDS" on stdout.  The file must be BYTES long.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: firsttouch FILE BYTES random|seq\n");
        return 1;
    }
    size_t len = strtoull(argv[2], 0, 0), pages = len / PAGE;
    int rnd = !strcmp(argv[3], "random");
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) { perror("open"); return 1; }
    volatile uint8_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 1; }
    uint64_t *order = malloc(pages * sizeof(*order));
    for (size_t i = 0; i < pages; i++) order[i] = i;
    if (rnd) {
        madvise((void *)m, len, MADV_RANDOM);
        uint64_t x = 88172645463325252ULL;
        for (size_t i = pages - 1; i > 0; i--) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            size_t j = x % (i + 1);
            uint64_t t = order[i]; order[i] = order[j]; order[j] = t;
        }
    } else {
        madvise((void *)m, len, MADV_SEQUENTIAL);
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (size_t i = 0; i < pages; i++)
        m[order[i] * PAGE] = 1;
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%zu %.6f\n", pages, (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
