/*
 * hmm_cpu — the CPU side of the ported HMM selftests (tools/testing/selftests/mm/
 * hmm-tests.c): one process that keeps a MAP_SHARED mapping of a region's data
 * file for its whole life, as hmm-tests keeps buffer->ptr, and acts on it when
 * told.  The device side is the test, through devices/NAME/access and snapshot.
 *
 *   hmm_cpu FILE PAGES
 *
 * Commands on stdin, one a line; one reply line each on stdout ("ok ..." or
 * "bad ...").  FIRST COUNT are in pages; values are hmm-tests' buffer pattern,
 * int ptr[i] = i + BASE with i counted from the start of the mapping.
 *
 *   fill FIRST COUNT BASE          ptr[i] = i + BASE over the pages (no msync)
 *   check FIRST COUNT BASE [ADD]   ptr[i] == i + BASE; with ADD, every 64-bit
 *                                  little-endian word == its original + ADD
 *                                  (what a device's "add ADD" leaves)
 *   bytes FIRST COUNT VALUE        every byte == VALUE
 *   touch FIRST COUNT              one load per page (a CPU read fault)
 *   store FIRST COUNT VALUE        one byte store per page, at offset 64
 *   mincore FIRST COUNT            "ok 0110..." one digit a page: resident?
 *   sync                           msync(MS_SYNC) of the whole mapping
 *   advise random|normal           madvise of the whole mapping
 *   quit
 *
 * MADV_RANDOM is the default so that a fault asks for exactly its own page
 * (no read-ahead), as the tests count pages.  A CPU access to a page the
 * emulator cannot serve kills the process with SIGBUS: the test sees EOF.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define INTS (PAGE / sizeof(int32_t))

static uint8_t *map;
static uint64_t pages;

static int range(uint64_t first, uint64_t count)
{
    if (first > pages || count > pages - first) {
        printf("bad range %" PRIu64 "+%" PRIu64 " beyond %" PRIu64 " pages\n", first, count, pages);
        return 0;
    }
    return 1;
}

static void fill(uint64_t first, uint64_t count, int64_t base)
{
    int32_t *p = (int32_t *)map;
    for (uint64_t i = first * INTS; i < (first + count) * INTS; i++)
        p[i] = (int32_t)(i + base);
}

static void check(uint64_t first, uint64_t count, int64_t base, int add, uint64_t delta)
{
    uint64_t bad = 0, where = 0, got = 0, want = 0;
    if (!add) {
        int32_t *p = (int32_t *)map;
        for (uint64_t i = first * INTS; i < (first + count) * INTS; i++) {
            int32_t w = (int32_t)(i + base);
            if (p[i] != w) {
                if (!bad++) { where = i; got = (uint32_t)p[i]; want = (uint32_t)w; }
            }
        }
    } else {
        /* 64-bit word k holds ints 2k (low half) and 2k+1 (high half). */
        for (uint64_t k = first * INTS / 2; k < (first + count) * INTS / 2; k++) {
            uint64_t orig = (uint64_t)(uint32_t)(int32_t)(2 * k + base)
                          | (uint64_t)(uint32_t)(int32_t)(2 * k + 1 + base) << 32;
            uint64_t w = orig + delta, v;
            memcpy(&v, map + 8 * k, 8);
            if (v != w) {
                if (!bad++) { where = k; got = v; want = w; }
            }
        }
    }
    if (bad)
        printf("bad %" PRIu64 " words differ, first word %" PRIu64 " (page %" PRIu64 ") got 0x%" PRIx64
               " want 0x%" PRIx64 "\n", bad, where, where * (add ? 8 : 4) / PAGE, got, want);
    else
        printf("ok\n");
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: hmm_cpu FILE PAGES\n");
        return 1;
    }
    pages = strtoull(argv[2], 0, 0);
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) { perror("open"); return 1; }
    map = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 1; }
    close(fd);
    madvise(map, pages * PAGE, MADV_RANDOM);
    setvbuf(stdout, NULL, _IOLBF, 0);

    char line[256], cmd[32], arg[32];
    while (fgets(line, sizeof(line), stdin)) {
        uint64_t first = 0, count = 0;
        long long base = 0;
        unsigned long long delta = 0;
        int n = sscanf(line, "%31s %" SCNu64 " %" SCNu64 " %lld %llu", cmd, &first, &count, &base, &delta);
        if (n < 1)
            continue;
        if (!strcmp(cmd, "quit"))
            break;
        if (!strcmp(cmd, "sync")) {
            printf(msync(map, pages * PAGE, MS_SYNC) ? "bad msync %s\n" : "ok\n", strerror(errno));
            continue;
        }
        if (!strcmp(cmd, "advise")) {
            sscanf(line, "%*s %31s", arg);
            int adv = !strcmp(arg, "random") ? MADV_RANDOM : MADV_NORMAL;
            printf(madvise(map, pages * PAGE, adv) ? "bad madvise %s\n" : "ok\n", strerror(errno));
            continue;
        }
        if (n < 3 || !range(first, count)) {
            if (n < 3)
                printf("bad command %s", line);
            continue;
        }
        if (!strcmp(cmd, "fill") && n >= 4) {
            fill(first, count, base);
            printf("ok\n");
        } else if (!strcmp(cmd, "check") && n >= 4) {
            check(first, count, base, n >= 5, delta);
        } else if (!strcmp(cmd, "bytes") && n >= 4) {
            uint64_t bad = 0, where = 0;
            for (uint64_t b = first * PAGE; b < (first + count) * PAGE; b++)
                if (map[b] != (uint8_t)base && !bad++)
                    where = b;
            if (bad)
                printf("bad %" PRIu64 " bytes differ, first at %" PRIu64 " = 0x%02x\n", bad, where, map[where]);
            else
                printf("ok\n");
        } else if (!strcmp(cmd, "touch")) {
            volatile uint8_t sink = 0;
            for (uint64_t i = first; i < first + count; i++)
                sink += map[i * PAGE];
            (void)sink;
            printf("ok\n");
        } else if (!strcmp(cmd, "store") && n >= 4) {
            for (uint64_t i = first; i < first + count; i++)
                map[i * PAGE + 64] = (uint8_t)base;
            printf("ok\n");
        } else if (!strcmp(cmd, "mincore")) {
            unsigned char *vec = malloc(count + 1);
            if (mincore(map + first * PAGE, count * PAGE, vec)) {
                printf("bad mincore %s\n", strerror(errno));
            } else {
                for (uint64_t i = 0; i < count; i++)
                    vec[i] = (vec[i] & 1) ? '1' : '0';
                vec[count] = 0;
                printf("ok %s\n", vec);
            }
            free(vec);
        } else {
            printf("bad command %s", line);
        }
    }
    munmap(map, pages * PAGE);
    return 0;
}
