/* cdmfs's own cases against /dev/hmm_dmirrorN under `cdmfs run` (the
 * kernel's HMM test device, emulated): every ioctl of hmm_dmirror.h with the
 * driver's documented results.  ./hmm_dmirror_cases DEV DEV2 [CASE...]:
 * DEV is the device under test, DEV2 a second one of the same kind.  One
 * line a case: "ok NAME" or "FAIL NAME: why". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hmm_dmirror.h"

#define PG 4096UL
#define NPAGES 1024UL
#define SIZE (NPAGES * PG)
#define TWO_MB (2UL << 20)

static int dev, dev2, coherent;
static char why[512];

#define CHECK(cond, ...)                                          \
    do {                                                          \
        if (!(cond)) {                                            \
            snprintf(why, sizeof why, __VA_ARGS__);               \
            return 1;                                             \
        }                                                         \
    } while (0)

static int open_dev(int n)
{
    char path[64];
    snprintf(path, sizeof path, "/dev/hmm_dmirror%d", n);
    return open(path, O_RDWR);
}

/* One command: 0 or -errno; cpages and faults in *c. */
static int run(int fd, unsigned long req, void *addr, void *ptr, unsigned long npages,
               struct hmm_dmirror_cmd *c)
{
    memset(c, 0, sizeof *c);
    c->addr = (uintptr_t)addr;
    c->ptr = (uintptr_t)ptr;
    c->npages = npages;
    while (ioctl(fd, req, c)) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}

static void *anon(size_t size, int prot)
{
    void *p = mmap(NULL, size, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static uint8_t local_code(void)
{
    return (coherent ? HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL : HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL) |
           HMM_DMIRROR_PROT_WRITE;
}

/* ------------------------------------------------------------ cases */

static int c_open_missing(int fd)
{
    (void)fd;
    errno = 0;
    CHECK(open("/dev/hmm_dmirror7", O_RDWR) < 0 && errno == ENOENT, "dmirror7: errno %d", errno);
    errno = 0;
    CHECK(open("/dev/hmm_dmirrorx", O_RDWR) < 0 && errno == ENOENT, "dmirrorx: errno %d", errno);
    int fd2 = open_dev(dev2);
    CHECK(fd2 >= 0, "second device: errno %d", errno);
    CHECK(close(fd2) == 0, "close");
    return 0;
}

static int c_bad_input(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(PG, PROT_READ | PROT_WRITE);
    int *m = malloc(2 * PG);
    memset(m, 0x5a, 2 * PG);
    b[0] = 7;
    CHECK(ioctl(fd, _IOWR('H', 0x3f, struct hmm_dmirror_cmd), &c) < 0 && errno == EINVAL,
          "unknown command: errno %d", errno);
    CHECK(ioctl(fd, HMM_DMIRROR_READ, (void *)8) < 0 && errno == EFAULT, "cmd outside: errno %d", errno);
    CHECK(run(fd, HMM_DMIRROR_READ, (char *)b + 8, m, 1, &c) == -EINVAL, "unaligned addr");
    CHECK(run(fd, HMM_DMIRROR_READ, b, m, 0, &c) == -EINVAL, "npages 0");
    CHECK(run(fd, HMM_DMIRROR_READ, b, m, 1UL << 52, &c) == -EINVAL, "npages wrapping");
    /* One page mapped, the next one not (made sure of by munmap of a pair). */
    char *pair = anon(2 * PG, PROT_READ | PROT_WRITE);
    munmap(pair + PG, PG);
    pair[0] = 1;
    CHECK(run(fd, HMM_DMIRROR_READ, pair, m, 2, &c) == -EFAULT, "READ beyond the mapping");
    CHECK(run(fd, HMM_DMIRROR_WRITE, pair, m, 2, &c) == -EFAULT, "WRITE beyond the mapping");
    CHECK(run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, pair, m, 2, &c) == -EINVAL, "MIGRATE beyond the mapping");
    CHECK(m[0] == 0x5a5a5a5a && pair[0] == 1, "a failed command changed bytes");
    CHECK(run(fd, HMM_DMIRROR_READ, b, (void *)16, 1, &c) == -EFAULT, "ptr outside the process");
    munmap(pair, PG);
    munmap(b, PG);
    free(m);
    return 0;
}

static int c_read(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
    uint8_t *s = malloc(NPAGES);
    for (unsigned long i = 2 * PG / 4; i < SIZE / 4; i++)
        b[i] = (int)i;
    CHECK(mprotect(b, SIZE, PROT_READ) == 0, "mprotect");
    CHECK(b[PG / 4] == 0, "page 1 reads zero");
    int r = run(fd, HMM_DMIRROR_READ, b, m, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES && c.faults == 1, "READ r=%d cpages=%lu faults=%lu", r,
          (unsigned long)c.cpages, (unsigned long)c.faults);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(m[i] == (i < 2 * PG / 4 ? 0 : (int)i), "device read %d at %lu", m[i], i);
    r = run(fd, HMM_DMIRROR_READ, b, m, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES && c.faults == 0, "second READ faults=%lu", (unsigned long)c.faults);
    r = run(fd, HMM_DMIRROR_SNAPSHOT, b, s, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES, "SNAPSHOT r=%d", r);
    CHECK(s[0] == (HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ), "page 0 %#x", s[0]);
    CHECK(s[1] == (HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ), "page 1 %#x", s[1]);
    CHECK(s[2] == HMM_DMIRROR_PROT_READ && s[NPAGES - 1] == HMM_DMIRROR_PROT_READ, "written pages %#x", s[2]);
    munmap(b, SIZE);
    free(m);
    free(s);
    return 0;
}

static int c_read_prot(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        b[i] = (int)i, m[i] = -(int)i;
    CHECK(mprotect(b, SIZE, PROT_NONE) == 0, "mprotect");
    CHECK(run(fd, HMM_DMIRROR_READ, b, m, NPAGES, &c) == -EFAULT, "READ of PROT_NONE");
    CHECK(mprotect(b, SIZE, PROT_READ) == 0, "mprotect");
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(b[i] == (int)i && m[i] == -(int)i, "bytes changed at %lu", i);
    munmap(b, SIZE);
    free(m);
    return 0;
}

static int c_write(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        m[i] = (int)i * 3;
    int r = run(fd, HMM_DMIRROR_WRITE, b, m, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES && c.faults == 1, "WRITE r=%d cpages=%lu faults=%lu", r,
          (unsigned long)c.cpages, (unsigned long)c.faults);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(b[i] == (int)i * 3, "CPU sees %d at %lu", b[i], i);
    r = run(fd, HMM_DMIRROR_WRITE, b, m, NPAGES, &c);
    CHECK(r == 0 && c.faults == 0, "second WRITE faults=%lu", (unsigned long)c.faults);
    munmap(b, SIZE);
    free(m);
    return 0;
}

static int c_write_prot(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ), *m = malloc(SIZE);
    int r = run(fd, HMM_DMIRROR_READ, b, m, 1, &c);
    CHECK(r == 0 && c.cpages == 1 && c.faults == 1, "READ of the zero page r=%d", r);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        m[i] = (int)i;
    CHECK(run(fd, HMM_DMIRROR_WRITE, b, m, NPAGES, &c) == -EPERM, "WRITE of PROT_READ");
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(b[i] == 0, "a refused WRITE wrote %d at %lu", b[i], i);
    CHECK(mprotect(b, SIZE, PROT_READ | PROT_WRITE) == 0, "mprotect");
    r = run(fd, HMM_DMIRROR_WRITE, b, m, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES && c.faults == 1, "WRITE r=%d faults=%lu", r, (unsigned long)c.faults);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(b[i] == (int)i, "CPU sees %d at %lu", b[i], i);
    munmap(b, SIZE);
    free(m);
    return 0;
}

static int c_migrate(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
    uint8_t *s = malloc(NPAGES);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        b[i] = (int)i;
    int r = run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, m, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES, "MIGRATE_TO_DEV r=%d cpages=%lu", r, (unsigned long)c.cpages);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(m[i] == (int)i, "device read %d at %lu", m[i], i);
    r = run(fd, HMM_DMIRROR_SNAPSHOT, b, s, NPAGES, &c);
    CHECK(r == 0 && s[0] == local_code() && s[NPAGES - 1] == local_code(), "SNAPSHOT %#x", s[0]);
    r = run(fd, HMM_DMIRROR_MIGRATE_TO_SYS, b, m, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES, "MIGRATE_TO_SYS r=%d cpages=%lu", r, (unsigned long)c.cpages);
    r = run(fd, HMM_DMIRROR_SNAPSHOT, b, s, NPAGES, &c);
    CHECK(r == 0 && s[0] == HMM_DMIRROR_PROT_WRITE, "after MIGRATE_TO_SYS %#x", s[0]);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(b[i] == (int)i, "CPU sees %d at %lu", b[i], i);
    munmap(b, SIZE);
    free(m);
    free(s);
    return 0;
}

static int c_migrate_fault(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
    uint8_t *s = malloc(NPAGES);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        b[i] = (int)i;
    int r = run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, m, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES, "MIGRATE_TO_DEV r=%d", r);
    for (unsigned long i = 0; i < SIZE / 8; i++)      /* half comes back (private) or is read in place */
        CHECK(b[i] == (int)i, "CPU sees %d at %lu", b[i], i);
    r = run(fd, HMM_DMIRROR_SNAPSHOT, b, s, NPAGES, &c);
    CHECK(r == 0, "SNAPSHOT");
    if (!coherent)
        CHECK(s[0] == HMM_DMIRROR_PROT_WRITE && s[NPAGES - 1] == local_code(),
              "after the CPU's faults: %#x %#x", s[0], s[NPAGES - 1]);
    else
        CHECK(s[0] == local_code(), "coherent memory stays on a CPU access: %#x", s[0]);
    r = run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, m, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES, "again r=%d cpages=%lu", r, (unsigned long)c.cpages);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(m[i] == (int)i, "device read %d at %lu", m[i], i);
    munmap(b, SIZE);
    free(m);
    free(s);
    return 0;
}

/* hmm-tests' hmm2 snapshot: seven pages in every state there is. */
static int c_snapshot(int fd)
{
    struct hmm_dmirror_cmd c;
    int fd2 = open_dev(dev2);
    CHECK(fd2 >= 0, "open the second device");
    char *p = anon(7 * PG, PROT_NONE);
    uint8_t *s = malloc(7);
    int *m = malloc(PG);
    CHECK(munmap(p + PG, PG) == 0, "munmap");
    CHECK(mprotect(p + 2 * PG, PG, PROT_READ) == 0, "mprotect");
    CHECK(*(int *)(p + 2 * PG) == 0, "page 2 reads zero");
    CHECK(mprotect(p + 3 * PG, PG, PROT_READ | PROT_WRITE) == 0, "mprotect");
    *(int *)(p + 3 * PG) = 3;
    CHECK(mprotect(p + 3 * PG, PG, PROT_READ) == 0, "mprotect");
    CHECK(mprotect(p + 4 * PG, 3 * PG, PROT_READ | PROT_WRITE) == 0, "mprotect");
    *(int *)(p + 4 * PG) = 3;
    int r = run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, p + 5 * PG, m, 1, &c);
    CHECK(r == 0 && c.cpages == 1, "page 5 to the device: r=%d", r);
    r = run(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, p + 6 * PG, m, 1, &c);
    CHECK(r == 0 && c.cpages == 1, "page 6 to the second device: r=%d", r);
    r = run(fd, HMM_DMIRROR_SNAPSHOT, p, s, 7, &c);
    CHECK(r == 0 && c.cpages == 7, "SNAPSHOT r=%d", r);
    CHECK(s[0] == HMM_DMIRROR_PROT_ERROR, "page 0 (PROT_NONE) %#x", s[0]);
    CHECK(s[1] == HMM_DMIRROR_PROT_ERROR, "page 1 (unmapped) %#x", s[1]);
    CHECK(s[2] == (HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ), "page 2 %#x", s[2]);
    CHECK(s[3] == HMM_DMIRROR_PROT_READ, "page 3 %#x", s[3]);
    CHECK(s[4] == HMM_DMIRROR_PROT_WRITE, "page 4 %#x", s[4]);
    CHECK(s[5] == local_code(), "page 5 %#x", s[5]);
    if (coherent)
        CHECK(s[6] == (HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE), "page 6 %#x", s[6]);
    else
        CHECK(s[6] == HMM_DMIRROR_PROT_NONE, "page 6 %#x", s[6]);
    close(fd2);
    return 0;
}

/* hmm-tests' hmm2 migrate_mixed. */
static int c_migrate_mixed(int fd)
{
    struct hmm_dmirror_cmd c;
    int fd2 = open_dev(dev2);
    CHECK(fd2 >= 0, "open the second device");
    char *p = anon(6 * PG, PROT_NONE);
    int *m = malloc(6 * PG);
    CHECK(run(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, p, m, 6, &c) == -EINVAL, "PROT_NONE");
    CHECK(munmap(p + PG, PG) == 0, "munmap");
    CHECK(run(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, p, m, 3, &c) == -EINVAL, "a hole");
    CHECK(mprotect(p + 2 * PG, PG, PROT_READ) == 0 && *(int *)(p + 2 * PG) == 0, "page 2");
    CHECK(mprotect(p + 3 * PG, PG, PROT_READ | PROT_WRITE) == 0, "mprotect");
    *(int *)(p + 3 * PG) = 3;
    CHECK(mprotect(p + 3 * PG, PG, PROT_READ) == 0, "mprotect");
    CHECK(mprotect(p + 4 * PG, 2 * PG, PROT_READ | PROT_WRITE) == 0, "mprotect");
    *(int *)(p + 4 * PG) = 3;
    *(int *)(p + 5 * PG) = 3;
    int r = run(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, p + 2 * PG, m, 4, &c);
    CHECK(r == 0 && c.cpages == 4, "pages 2-5: r=%d cpages=%lu", r, (unsigned long)c.cpages);
    CHECK(m[0] == 0 && m[PG / 4] == 3 && m[2 * PG / 4] == 3, "migrated bytes");
    r = run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, p + 5 * PG, m, 1, &c);
    CHECK(r == -ENOENT, "a page on the other device: r=%d", r);
    close(fd2);
    return 0;
}

static int c_migrate_shared(int fd)
{
    struct hmm_dmirror_cmd c;
    void *b = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int *m = malloc(SIZE);
    CHECK(run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, m, NPAGES, &c) == -ENOENT, "shared memory migrated");
    munmap(b, SIZE);
    free(m);
    return 0;
}

static int c_exclusive(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        b[i] = (int)i;
    int r = run(fd, HMM_DMIRROR_EXCLUSIVE, b, m, NPAGES, &c);
    CHECK(r == 0 && c.cpages == NPAGES, "EXCLUSIVE r=%d cpages=%lu", r, (unsigned long)c.cpages);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(m[i] == (int)i, "device read %d at %lu", m[i], i);
    CHECK(run(fd, HMM_DMIRROR_CHECK_EXCLUSIVE, b, m, NPAGES, &c) == -EPERM, "held before the CPU's access");
    /* The CPU touches half: still exclusive where it did not. */
    for (unsigned long i = 0; i < SIZE / 8; i++)
        b[i]++;
    CHECK(run(fd, HMM_DMIRROR_CHECK_EXCLUSIVE, b, m, NPAGES / 2, &c) == 0, "revoked on the touched half");
    CHECK(run(fd, HMM_DMIRROR_CHECK_EXCLUSIVE, b, m, NPAGES, &c) == -EPERM, "held on the other half");
    for (unsigned long i = SIZE / 8; i < SIZE / 4; i++)
        b[i]++;
    CHECK(run(fd, HMM_DMIRROR_CHECK_EXCLUSIVE, b, m, NPAGES, &c) == 0, "revoked everywhere");
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(b[i] == (int)i + 1, "CPU sees %d at %lu", b[i], i);
    munmap(b, SIZE);
    free(m);
    return 0;
}

static int c_exclusive_mprotect(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        b[i] = (int)i;
    CHECK(run(fd, HMM_DMIRROR_EXCLUSIVE, b, m, NPAGES, &c) == 0, "EXCLUSIVE");
    CHECK(mprotect(b, SIZE, PROT_READ) == 0, "mprotect");
    CHECK(run(fd, HMM_DMIRROR_WRITE, b, m, NPAGES, &c) == -EPERM, "WRITE after PROT_READ");
    CHECK(run(fd, HMM_DMIRROR_EXCLUSIVE, b, m, NPAGES, &c) == -EFAULT, "EXCLUSIVE of PROT_READ");
    munmap(b, SIZE);
    free(m);
    return 0;
}

/* A child's device writes its own copy of private memory; the parent's stays. */
static int c_fork_private(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        b[i] = (int)i, m[i] = -(int)i;
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        for (unsigned long i = 0; i < SIZE / 4; i++)
            if (b[i] != (int)i)
                _exit(2);
        int cfd = open_dev(dev);
        if (cfd < 0 || run(cfd, HMM_DMIRROR_WRITE, b, m, NPAGES, &c) || c.cpages != NPAGES || c.faults != 1)
            _exit(3);
        for (unsigned long i = 0; i < SIZE / 4; i++)
            if (b[i] != -(int)i)
                _exit(4);
        _exit(0);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(b[i] == (int)i, "the child's write reached the parent: %d at %lu", b[i], i);
    munmap(b, SIZE);
    free(m);
    return 0;
}

/* Shared anonymous memory stays shared: the child's device write is the parent's. */
static int c_fork_shared(int fd)
{
    (void)fd;
    struct hmm_dmirror_cmd c;
    int *b = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int *m = malloc(SIZE);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        b[i] = (int)i, m[i] = -(int)i;
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        int cfd = open_dev(dev);
        if (cfd < 0 || run(cfd, HMM_DMIRROR_WRITE, b, m, NPAGES, &c) || c.cpages != NPAGES)
            _exit(3);
        _exit(0);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(b[i] == -(int)i, "parent sees %d at %lu", b[i], i);
    munmap(b, SIZE);
    free(m);
    return 0;
}

static int c_release(int fd)
{
    struct hmm_dmirror_cmd c;
    int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
    uint8_t *s = malloc(NPAGES);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        b[i] = (int)i;
    CHECK(run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, m, NPAGES, &c) == 0, "MIGRATE_TO_DEV");
    CHECK(run(fd, HMM_DMIRROR_RELEASE, b, m, NPAGES, &c) == 0, "RELEASE");
    CHECK(run(fd, HMM_DMIRROR_SNAPSHOT, b, s, NPAGES, &c) == 0, "SNAPSHOT");
    for (unsigned long i = 0; i < NPAGES; i++)
        CHECK(s[i] == HMM_DMIRROR_PROT_WRITE, "page %lu still in the device: %#x", i, s[i]);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        CHECK(b[i] == (int)i, "CPU sees %d at %lu", b[i], i);
    CHECK(run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, m, NPAGES, &c) == 0 && c.cpages == NPAGES,
          "the device takes memory again");
    munmap(b, SIZE);
    free(m);
    free(s);
    return 0;
}

/* MADV_HUGEPAGE at 2 MiB: 512 small pages, no PROT_PMD; FAIL_ALLOC fails a
 * huge page's allocation (which falls back to small pages) there, a small
 * page's elsewhere (the driver skips that page: the read-back is ENOENT). */
static int c_huge_and_fail_alloc(int fd)
{
    struct hmm_dmirror_cmd c;
    char *raw = anon(2 * TWO_MB, PROT_READ | PROT_WRITE);
    int *b = (int *)(((uintptr_t)raw + TWO_MB - 1) & ~(TWO_MB - 1));
    int *m = malloc(TWO_MB);
    uint8_t *s = malloc(TWO_MB / PG);
    unsigned long n = TWO_MB / PG;
    CHECK(madvise(b, TWO_MB, MADV_HUGEPAGE) == 0, "MADV_HUGEPAGE: errno %d", errno);
    for (unsigned long i = 0; i < TWO_MB / 4; i++)
        m[i] = (int)i;
    int r = run(fd, HMM_DMIRROR_WRITE, b, m, n, &c);
    CHECK(r == 0 && c.cpages == n && c.faults == 1, "WRITE r=%d", r);
    CHECK(run(fd, HMM_DMIRROR_SNAPSHOT, b, s, n, &c) == 0, "SNAPSHOT");
    for (unsigned long i = 0; i < n; i++)
        CHECK(s[i] == HMM_DMIRROR_PROT_WRITE, "page %lu %#x (no PMD mapping here)", i, s[i]);
    CHECK(run(fd, HMM_DMIRROR_FLAGS, b, m, HMM_DMIRROR_FLAG_FAIL_ALLOC, &c) == 0, "FLAGS");
    r = run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, m, n, &c);
    CHECK(r == 0 && c.cpages == n, "huge range with FAIL_ALLOC: r=%d cpages=%lu", r, (unsigned long)c.cpages);
    for (unsigned long i = 0; i < TWO_MB / 4; i++)
        CHECK(m[i] == (int)i, "device read %d at %lu", m[i], i);
    int *small = anon(SIZE, PROT_READ | PROT_WRITE);
    for (unsigned long i = 0; i < SIZE / 4; i++)
        small[i] = (int)i;
    CHECK(run(fd, HMM_DMIRROR_FLAGS, small, m, HMM_DMIRROR_FLAG_FAIL_ALLOC, &c) == 0, "FLAGS");
    r = run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, small, m, 16, &c);
    CHECK(r == -ENOENT, "small pages with FAIL_ALLOC: r=%d", r);
    r = run(fd, HMM_DMIRROR_MIGRATE_TO_DEV, small, m, 16, &c);
    CHECK(r == 0 && c.cpages == 16, "the flag is spent: r=%d", r);
    munmap(small, SIZE);
    munmap(raw, 2 * TWO_MB);
    free(m);
    free(s);
    return 0;
}

/* Two devices read the same memory; then it migrates to the second and the
 * first reads it (faulting it back to system memory if private). */
static int c_double_map(int fd)
{
    struct hmm_dmirror_cmd c;
    int fd2 = open_dev(dev2);
    unsigned long n = 6;
    int *b = anon(n * PG, PROT_READ | PROT_WRITE), *m = malloc(n * PG);
    for (unsigned long i = 0; i < n * PG / 4; i++)
        b[i] = (int)i;
    CHECK(mprotect(b, n * PG, PROT_READ) == 0, "mprotect");
    int r = run(fd, HMM_DMIRROR_READ, b, m, n, &c);
    CHECK(r == 0 && c.cpages == n && c.faults == 1, "READ by the first: r=%d", r);
    r = run(fd2, HMM_DMIRROR_READ, b, m, n, &c);
    CHECK(r == 0 && c.cpages == n && c.faults == 1, "READ by the second: r=%d", r);
    r = run(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, b, m, n, &c);
    CHECK(r == 0 && c.cpages == n, "MIGRATE to the second: r=%d", r);
    memset(m, 0, n * PG);
    r = run(fd, HMM_DMIRROR_READ, b, m, n, &c);
    CHECK(r == 0 && c.cpages == n && c.faults == 1, "READ by the first again: r=%d faults=%lu", r,
          (unsigned long)c.faults);
    for (unsigned long i = 0; i < n * PG / 4; i++)
        CHECK(m[i] == (int)i, "device read %d at %lu", m[i], i);
    close(fd2);
    return 0;
}

struct teardown { char *p; size_t size; };

static void *unmap_half(void *arg)
{
    struct teardown *t = arg;
    struct timespec ts = {0, (long)(rand() % 32000)};
    nanosleep(&ts, NULL);
    munmap(t->p + t->size / 2, t->size / 2);
    return NULL;
}

/* munmap while the device reads: the read either fails (EFAULT) or saw the bytes. */
static int c_teardown(int fd)
{
    struct hmm_dmirror_cmd c;
    int ok = 0, failed = 0;
    for (int k = 0; k < 10; k++) {
        int *b = anon(SIZE, PROT_READ | PROT_WRITE), *m = malloc(SIZE);
        for (unsigned long i = 0; i < SIZE / 4; i++)
            b[i] = (int)i + k;
        struct teardown t = {(char *)b, SIZE};
        pthread_t th;
        pthread_create(&th, NULL, unmap_half, &t);
        int r = run(fd, HMM_DMIRROR_READ, b, m, NPAGES, &c);
        if (r == 0) {
            CHECK(c.cpages == NPAGES, "cpages %lu", (unsigned long)c.cpages);
            for (unsigned long i = 0; i < SIZE / 4; i++)
                CHECK(m[i] == (int)i + k, "device read %d at %lu", m[i], i);
            ok++;
        } else {
            CHECK(r == -EFAULT, "READ failed with %d", r);
            failed++;
        }
        pthread_join(th, NULL);
        munmap(b, SIZE / 2);
        free(m);
    }
    CHECK(ok + failed == 10, "runs");
    return 0;
}

/* More than one copy request moves at once (16 MiB): the interposer cuts it. */
static int c_large(int fd)
{
    struct hmm_dmirror_cmd c;
    unsigned long n = (20UL << 20) / PG + 1, size = n * PG;
    int *b = anon(size, PROT_READ | PROT_WRITE), *m = malloc(size);
    for (unsigned long i = 0; i < size / 4; i++)
        b[i] = (int)(i * 7);
    int r = run(fd, HMM_DMIRROR_READ, b, m, n, &c);
    CHECK(r == 0 && c.cpages == n && c.faults == 1, "READ r=%d cpages=%lu", r, (unsigned long)c.cpages);
    for (unsigned long i = 0; i < size / 4; i++)
        CHECK(m[i] == (int)(i * 7), "device read %d at %lu", m[i], i);
    for (unsigned long i = 0; i < size / 4; i++)
        m[i] = (int)i;
    r = run(fd, HMM_DMIRROR_WRITE, b, m, n, &c);
    CHECK(r == 0 && c.cpages == n, "WRITE r=%d cpages=%lu", r, (unsigned long)c.cpages);
    for (unsigned long i = 0; i < size / 4; i++)
        CHECK(b[i] == (int)i, "CPU sees %d at %lu", b[i], i);
    munmap(b, size);
    free(m);
    return 0;
}

/* mmap of the device file: the driver's zeroed pages, present at once,
 * read-only in a private mapping until the CPU writes one. */
static int c_mixedmap(int fd)
{
    struct hmm_dmirror_cmd c;
    uint8_t s[2];
    char *p = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    CHECK(p != MAP_FAILED, "mmap of the device: errno %d", errno);
    CHECK(p[0] == 0 && p[PG] == 0, "the driver's pages read zero");
    p[PG] = 1;
    int r = run(fd, HMM_DMIRROR_SNAPSHOT, p, s, 2, &c);
    CHECK(r == 0 && c.cpages == 2, "SNAPSHOT r=%d", r);
    CHECK(s[0] == HMM_DMIRROR_PROT_READ, "page 0 %#x", s[0]);
    CHECK(s[1] == HMM_DMIRROR_PROT_WRITE, "page 1 (written: copied on write) %#x", s[1]);
    munmap(p, 2 * PG);
    return 0;
}

/* A device descriptor closed behind the interposer's back (a raw close)
 * and its number reused: the new file's ioctls reach the kernel. */
static int c_fd_reuse(int fd)
{
    (void)fd;
    struct hmm_dmirror_cmd c = {0};
    int d = open_dev(dev);
    CHECK(d >= 0, "open");
    syscall(SYS_close, d);
    int n = open("/dev/null", O_RDONLY);
    CHECK(n == d, "the number was not reused (%d, %d)", n, d);
    errno = 0;
    CHECK(ioctl(n, HMM_DMIRROR_READ, &c) < 0 && errno == ENOTTY, "ioctl on /dev/null: errno %d", errno);
    close(n);
    return 0;
}

struct kase { const char *name; int (*fn)(int); };

static const struct kase cases[] = {
    {"open_missing", c_open_missing}, {"bad_input", c_bad_input}, {"read", c_read},
    {"read_prot", c_read_prot}, {"write", c_write}, {"write_prot", c_write_prot},
    {"migrate", c_migrate}, {"migrate_fault", c_migrate_fault}, {"snapshot", c_snapshot},
    {"migrate_mixed", c_migrate_mixed}, {"migrate_shared", c_migrate_shared},
    {"exclusive", c_exclusive}, {"exclusive_mprotect", c_exclusive_mprotect},
    {"fork_private", c_fork_private}, {"fork_shared", c_fork_shared}, {"release", c_release},
    {"huge_and_fail_alloc", c_huge_and_fail_alloc}, {"double_map", c_double_map},
    {"teardown", c_teardown}, {"mixedmap", c_mixedmap}, {"large", c_large}, {"fd_reuse", c_fd_reuse},
};

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s DEV DEV2 [CASE...]\n", argv[0]);
        return 2;
    }
    dev = atoi(argv[1]);
    dev2 = atoi(argv[2]);
    coherent = dev >= 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        int wanted = argc == 3;
        for (int a = 3; a < argc; a++)
            wanted |= !strcmp(argv[a], cases[k].name);
        if (!wanted)
            continue;
        int fd = open_dev(dev);
        if (fd < 0) {
            printf("FAIL %s: open /dev/hmm_dmirror%d: errno %d\n", cases[k].name, dev, errno);
            continue;
        }
        why[0] = 0;
        if (cases[k].fn(fd))
            printf("FAIL %s: %s\n", cases[k].name, why);
        else
            printf("ok %s\n", cases[k].name);
        if (close(fd))
            printf("FAIL %s: close errno %d\n", cases[k].name, errno);
    }
    return 0;
}
