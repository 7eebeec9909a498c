/*
 * hmm_stress — CPU threads writing and verifying their own pages of a region
 * through one MAP_SHARED mapping, while the test migrates the pages under them.
 *
 *   hmm_stress run FILE PAGES FIRST COUNT THREADS MAXSECONDS SHADOW [PAUSE_US]
 *   hmm_stress check FILE PAGES FIRST COUNT SHADOW
 *
 * run: pages [FIRST, FIRST+COUNT) are split between THREADS threads.  Each
 * page holds 64 records of 64 bytes; a thread repeatedly picks one of its
 * records, writes it with the next sequence number (word 0 the sequence,
 * word 1 the record's index, words 2-7 derived from both), reads it back, and
 * checks another of its records against the sequence it last wrote there
 * (never written: zeros).  Nothing is msync'ed: the data lives in the host's
 * page cache as dirty pages, and every migration must take it through
 * write-back.  It prints "running" once the threads have started, stops when
 * a line arrives on stdin (or after MAXSECONDS), checks every record of every
 * page once more, writes the sequence table to SHADOW, and prints
 *   ok records=N checks=N corrupt=N
 * (exit status 2 if any record was wrong).
 *
 * check: maps the file afresh in a new process and checks every record
 * against SHADOW: what the emulator kept after all the moves.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define REC 64
#define RECS_PER_PAGE (PAGE / REC)
#define WORDS (REC / 8)

static uint8_t *map;
static uint64_t first_page, count;
static uint64_t *shadow;            /* last sequence written, per record of [first, first+count) */
static atomic_int stop;
static long pause_us = 200;         /* after every 64 records: leave the CPUs to the daemon */
static atomic_uint_fast64_t total_records, total_checks, total_corrupt;

static uint64_t splitmix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The record idx (counted from page 0 of the file) with sequence seq. */
static void record(uint64_t *w, uint64_t idx, uint64_t seq)
{
    if (!seq) {
        memset(w, 0, REC);
        return;
    }
    w[0] = seq;
    w[1] = idx;
    for (int j = 2; j < WORDS; j++)
        w[j] = splitmix(seq * 0x100000001b3ULL ^ idx << 8 ^ (uint64_t)j);
}

static uint64_t *slot(uint64_t idx) { return (uint64_t *)(map + idx * REC); }

static int verify(uint64_t idx, uint64_t seq, const char *when)
{
    uint64_t want[WORDS], got[WORDS];
    record(want, idx, seq);
    memcpy(got, slot(idx), REC);
    if (!memcmp(want, got, REC))
        return 0;
    if (atomic_fetch_add(&total_corrupt, 1) < 10)
        fprintf(stderr, "%s: record %" PRIu64 " (page %" PRIu64 ") holds seq %" PRIu64 " idx %" PRIu64
                ", want seq %" PRIu64 "\n", when, idx, idx / RECS_PER_PAGE, got[0], got[1], seq);
    return 1;
}

struct worker { uint64_t page, npages, rng; };

static uint64_t next(uint64_t *s) { *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s; }

static void *work(void *arg)
{
    struct worker *wk = arg;
    uint64_t recs = wk->npages * RECS_PER_PAGE, base = wk->page * RECS_PER_PAGE;
    uint64_t records = 0, checks = 0, seq = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        for (int k = 0; k < 64; k++) {
            uint64_t idx = base + next(&wk->rng) % recs;
            uint64_t w[WORDS];
            record(w, idx, ++seq);
            memcpy(slot(idx), w, REC);
            shadow[idx - first_page * RECS_PER_PAGE] = seq;
            verify(idx, seq, "read back");
            uint64_t other = base + next(&wk->rng) % recs;
            verify(other, shadow[other - first_page * RECS_PER_PAGE], "check");
            records++;
            checks += 2;
        }
        /* Leave the CPUs to the daemon and the migrations now and then. */
        struct timespec ts = {pause_us / 1000000, pause_us % 1000000 * 1000};
        if (pause_us)
            nanosleep(&ts, NULL);
    }
    atomic_fetch_add(&total_records, records);
    atomic_fetch_add(&total_checks, checks);
    return NULL;
}

static uint8_t *map_file(const char *path, uint64_t pages)
{
    int fd = open(path, O_RDWR);
    if (fd < 0) { perror("open"); exit(1); }
    uint8_t *m = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(1); }
    close(fd);
    madvise(m, pages * PAGE, MADV_RANDOM);
    return m;
}

int main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: hmm_stress run FILE PAGES FIRST COUNT THREADS MAXSECONDS SHADOW [PAUSE_US]\n"
                        "       hmm_stress check FILE PAGES FIRST COUNT SHADOW\n");
        return 1;
    }
    int run = !strcmp(argv[1], "run");
    uint64_t pages = strtoull(argv[3], 0, 0);
    first_page = strtoull(argv[4], 0, 0);
    count = strtoull(argv[5], 0, 0);
    if (first_page + count > pages) { fprintf(stderr, "range beyond the file\n"); return 1; }
    uint64_t nrec = count * RECS_PER_PAGE;
    shadow = calloc(nrec, sizeof(*shadow));
    map = map_file(argv[2], pages);
    setvbuf(stdout, NULL, _IOLBF, 0);

    if (!run) {
        FILE *f = fopen(argv[6], "rb");
        if (!f || fread(shadow, sizeof(*shadow), nrec, f) != nrec) { perror("shadow"); return 1; }
        fclose(f);
        for (uint64_t i = 0; i < nrec; i++)
            verify(first_page * RECS_PER_PAGE + i, shadow[i], "fresh mapping");
        uint64_t bad = atomic_load(&total_corrupt);
        printf("ok records=%" PRIu64 " corrupt=%" PRIu64 "\n", nrec, bad);
        return bad ? 2 : 0;
    }

    int threads = atoi(argv[6]);
    double maxsec = atof(argv[7]);
    if (argc > 9)
        pause_us = atol(argv[9]);
    if (argc < 9 || threads < 1 || count < (uint64_t)threads) { fprintf(stderr, "bad arguments\n"); return 1; }
    pthread_t tid[threads];
    struct worker wk[threads];
    uint64_t per = count / threads;
    for (int t = 0; t < threads; t++) {
        wk[t].page = first_page + t * per;
        wk[t].npages = t == threads - 1 ? count - t * per : per;
        wk[t].rng = 0x2545f4914f6cdd1dULL * (t + 1);
        if (pthread_create(&tid[t], NULL, work, &wk[t])) { perror("pthread_create"); return 1; }
    }
    printf("running\n");
    struct pollfd pfd = {0, POLLIN, 0};
    poll(&pfd, 1, (int)(maxsec * 1000));
    atomic_store(&stop, 1);
    for (int t = 0; t < threads; t++)
        pthread_join(tid[t], NULL);
    for (uint64_t i = 0; i < nrec; i++)
        verify(first_page * RECS_PER_PAGE + i, shadow[i], "final");
    FILE *f = fopen(argv[8], "wb");
    if (!f || fwrite(shadow, sizeof(*shadow), nrec, f) != nrec || fclose(f)) { perror("shadow"); return 1; }
    uint64_t bad = atomic_load(&total_corrupt);
    printf("ok records=%" PRIu64 " checks=%" PRIu64 " corrupt=%" PRIu64 "\n",
           (uint64_t)atomic_load(&total_records), (uint64_t)atomic_load(&total_checks), bad);
    munmap(map, pages * PAGE);
    return bad ? 2 : 0;
}
