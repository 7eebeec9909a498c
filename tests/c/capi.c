/*
 * A program that wants the devices, built against the installed C API
 * (cdmfs.h, libcdmfs.so) by tests/test_capi.py.
 *
 *   capi seed MOUNT REGION DEVICE NPAGES [FIRST_TARGET]
 *       The seed's scenario: map a region, fill a buffer, hand the pointer to
 *       a "library" that runs a kernel (add 1000 to every word) on DEVICE,
 *       then read the results back on the CPU and check every byte.  With
 *       FIRST_TARGET the buffer is migrated there before the kernel.  Prints
 *       a line per step and, after the kernel, waits for a line on stdin so
 *       that the test can look at the mount while the pages are on the device.
 *   capi split MOUNT REGION1 REGION2
 *       One pointer range over two regions' mappings, back to back.
 *   capi errors MOUNT REGION
 *       The error rules (errno), printed as NAME=ERRNO lines.
 *   capi unpriv MOUNT REGION
 *       cdmfs_where for a user who sees no frames in pagemap.
 * Exit 0 when every check holds; 2 with a message otherwise.
 */
#define _GNU_SOURCE
#include <cdmfs.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define PAGE 4096UL

static void die(const char *what)
{
    fprintf(stderr, "%s: %s (%s)\n", what, strerror(errno), cdmfs_last_error());
    exit(2);
}

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "check failed: %s\n", what);
        exit(2);
    }
}

static uint32_t crc32_of(const void *buf, size_t len)
{
    static uint32_t table[256];
    if (!table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    uint32_t crc = 0xffffffffu;
    for (const unsigned char *p = buf; len--; p++)
        crc = table[(crc ^ *p) & 0xff] ^ (crc >> 8);
    return crc ^ 0xffffffffu;
}

/* Makes (if missing) and maps a region of npages, MAP_SHARED. */
static uint64_t *map_region(const char *mount, const char *name, size_t npages, void *at, int flags)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/regions/%s", mount, name);
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
        die("mkdir region");
    snprintf(path, sizeof path, "%s/regions/%s/data", mount, name);
    int fd = open(path, O_RDWR);
    if (fd < 0)
        die("open data");
    if (ftruncate(fd, (off_t)(npages * PAGE)) != 0)
        die("ftruncate");
    void *p = mmap(at, npages * PAGE, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    close(fd);
    return p;
}

static void where(const char *label, const void *p)
{
    char buf[64];
    int rc = cdmfs_where(p, buf, sizeof buf);
    if (rc == -1)
        die("cdmfs_where");
    printf("%s %s %d\n", label, buf, rc);
}

static void print_access(const char *label, const struct cdmfs_access_result *r)
{
    printf("%s bytes=%" PRIu64 " faults=%" PRIu64 " migrated=%" PRIu64 " local_bytes=%" PRIu64
           " remote_bytes=%" PRIu64 " modeled_ns=%" PRIu64 " crc32=0x%08x\n",
           label, r->bytes, r->faults, r->migrated, r->local_bytes, r->remote_bytes, r->modeled_ns, r->crc32);
}

/* The "library": runs a kernel on the device over a buffer it was handed. */
static void library_add(const char *device, void *buf, size_t len, uint64_t n)
{
    struct cdmfs_access_result r;
    if (cdmfs_device_access(device, CDMFS_ADD, buf, len, n, &r) != 0)
        die("cdmfs_device_access add");
    print_access("kernel", &r);
}

static int seed(const char *mount, const char *name, const char *device, size_t npages, const char *first)
{
    size_t len = npages * PAGE, words = len / 8;
    uint64_t *buf = map_region(mount, name, npages, NULL, MAP_SHARED);
    where("untouched", buf);
    for (size_t i = 0; i < words; i++)          /* the program fills its buffer */
        buf[i] = i * 3 + 1;
    where("filled", buf);
    if (first) {
        struct cdmfs_migrate_result m;
        if (cdmfs_migrate(buf, len, first, &m) != 0)
            die("cdmfs_migrate");
        printf("migrated requested=%" PRIu64 " migrated=%" PRIu64 " skipped=%" PRIu64 "\n", m.requested,
               m.migrated, m.skipped);
        where("moved", buf);
    }
    library_add(device, buf, len, 1000);
    where("after-kernel", buf);
    where("after-kernel-last", (char *)buf + len - 1);
    printf("kernel-done\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))      /* the test looks at the mount meanwhile */
        return 2;
    size_t bad = 0;
    for (size_t i = 0; i < words; i++)          /* back on the CPU */
        if (buf[i] != i * 3 + 1 + 1000)
            bad++;
    printf("verified %zu of %zu words wrong\n", bad, words);
    where("after-cpu", buf);
    struct cdmfs_access_result r;
    if (cdmfs_device_access(device, CDMFS_READ, buf, len, 0, &r) != 0)
        die("cdmfs_device_access read");
    print_access("read", &r);
    check(r.crc32 == crc32_of(buf, len), "the device's crc32 is the CPU's");
    check(r.bytes == len, "read bytes");
    munmap(buf, len);
    return bad ? 2 : 0;
}

/* prefetch:TARGET returns at once: waits until the region's stat says no
 * prefetch is under way any more. */
static void wait_prefetch(const char *mount, const char *region)
{
    char path[4096], buf[4096];
    snprintf(path, sizeof path, "%s/regions/%s/stat", mount, region);
    for (int tries = 0; tries < 60000; tries++) {
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            die("open stat");
        ssize_t k = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (k < 0)
            die("read stat");
        buf[k] = 0;
        char *line = strstr(buf, "\nprefetch_active ");
        if (line && strtoul(line + strlen("\nprefetch_active "), NULL, 10) == 0)
            return;
        usleep(1000);
    }
    errno = ETIMEDOUT;
    die("prefetch");
}

static int split(const char *mount, const char *r1, const char *r2)
{
    size_t n = 8, len = 2 * n * PAGE;
    /* One reservation, then each half a region's mapping, back to back; the
     * second region's half is three mappings of consecutive bytes (the
     * kernel keeps a VMA with other flags apart). */
    char *base = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        die("reserve");
    map_region(mount, r1, n, base, MAP_SHARED | MAP_FIXED);
    map_region(mount, r2, n, base + n * PAGE, MAP_SHARED | MAP_FIXED);
    if (madvise(base + (n + 2) * PAGE, PAGE, MADV_RANDOM) != 0)
        die("madvise");
    for (size_t i = 0; i < len; i++)
        base[i] = (char)(i * 7 + 3);
    struct cdmfs_access_result r;
    /* A range starting in the middle of the first region and ending in the second. */
    char *from = base + 4 * PAGE;
    size_t span = len - 6 * PAGE;
    if (cdmfs_device_access("gpu0", CDMFS_READ, from, span, 0, &r) != 0)
        die("read across regions");
    print_access("read", &r);
    check(r.crc32 == crc32_of(from, span), "crc32 of a range over two regions");
    check(r.bytes == span, "bytes over two regions");
    if (cdmfs_device_access("gpu0", CDMFS_WRITE, from, span, 0xab, &r) != 0)
        die("write across regions");
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)base[i] != (base + i >= from && base + i < from + span ? 0xab : (unsigned char)(i * 7 + 3))) {
            fprintf(stderr, "byte %zu is %#x\n", i, (unsigned char)base[i]);
            return 2;
        }
    struct cdmfs_migrate_result m;
    /* an unaligned range: the pages holding it */
    if (cdmfs_migrate(base + 100, len - 200, "gpu0", &m) != 0)
        die("migrate across regions");
    printf("migrated requested=%" PRIu64 " migrated=%" PRIu64 " skipped=%" PRIu64 "\n", m.requested, m.migrated,
           m.skipped);
    for (size_t p = 0; p < 2 * n; p += 5)
        where("page", base + p * PAGE);
    /* pin one page of each region: those are skipped */
    if (cdmfs_advise(base + n * PAGE - 1, 2, "pin") != 0)
        die("pin");
    if (cdmfs_migrate(base, len, "cpu", &m) != 0)
        die("migrate to cpu");
    printf("to-cpu requested=%" PRIu64 " migrated=%" PRIu64 " skipped=%" PRIu64 "\n", m.requested, m.migrated,
           m.skipped);
    if (cdmfs_migrate(base, len, "gpu0", &m) != 0)
        die("migrate pinned");
    printf("pinned requested=%" PRIu64 " migrated=%" PRIu64 " skipped=%" PRIu64 "\n", m.requested, m.migrated,
           m.skipped);
    where("pinned-page", base + (n - 1) * PAGE);
    where("pinned-page", base + n * PAGE);
    if (cdmfs_advise(base, len, "unpin") != 0)
        die("unpin");
    if (cdmfs_prefetch(base, len, "cdm0") != 0)
        die("prefetch");
    wait_prefetch(mount, r1);
    wait_prefetch(mount, r2);
    where("prefetched", base);
    where("prefetched", base + len - 1);
    munmap(base, len);
    return 0;
}

#define EXPECT(label, call)                                                         \
    do {                                                                            \
        errno = 0;                                                                  \
        int rc_ = (call);                                                           \
        printf("%s=%s\n", label, rc_ == -1 ? strerrorname_np(errno) : "ok");       \
        if (rc_ == -1 && !*cdmfs_last_error())                                      \
            check(0, "a failure says why");                                         \
    } while (0)

static int errors(const char *mount, const char *name)
{
    size_t n = 4, len = n * PAGE;
    uint64_t *buf = map_region(mount, name, n, NULL, MAP_SHARED);
    memset(buf, 1, len);
    void *heap = aligned_alloc(PAGE, len);      /* the ordinary heap: in no region */
    memset(heap, 1, len);
    char where_buf[64];
    EXPECT("heap", cdmfs_device_access("gpu0", CDMFS_READ, heap, len, 0, NULL));
    EXPECT("heap_migrate", cdmfs_migrate(heap, len, "gpu0", NULL));
    EXPECT("heap_where", cdmfs_where(heap, where_buf, sizeof where_buf));
    EXPECT("null", cdmfs_device_access("gpu0", CDMFS_TOUCH, NULL, PAGE, 0, NULL));
    EXPECT("past_end", cdmfs_device_access("gpu0", CDMFS_READ, buf, len + PAGE, 0, NULL));
    EXPECT("wraps", cdmfs_migrate((char *)buf + PAGE, SIZE_MAX, "gpu0", NULL));
    EXPECT("unknown_device", cdmfs_device_access("gpu7", CDMFS_READ, buf, len, 0, NULL));
    EXPECT("device_path", cdmfs_device_access("../regions", CDMFS_READ, buf, len, 0, NULL));
    EXPECT("bad_op", cdmfs_device_access("gpu0", 42, buf, len, 0, NULL));
    EXPECT("negative_op", cdmfs_device_access("gpu0", -1, buf, len, 0, NULL));
    EXPECT("unaligned", cdmfs_device_access("gpu0", CDMFS_READ, (char *)buf + 8, PAGE, 0, NULL));
    EXPECT("bad_byte", cdmfs_device_access("gpu0", CDMFS_WRITE, buf, len, 256, NULL));
    EXPECT("bad_target", cdmfs_migrate(buf, len, "node:9", NULL));
    EXPECT("space_target", cdmfs_migrate(buf, len, "gpu0 0", NULL));
    EXPECT("bad_advice", cdmfs_advise(buf, len, "frobnicate"));
    EXPECT("small_buffer", cdmfs_where(buf, where_buf, 3));
    EXPECT("zero_length", cdmfs_device_access("gpu0", CDMFS_READ, heap, 0, 0, NULL));
    EXPECT("where_null_buffer", cdmfs_where(buf, NULL, 0) == 0 ? 0 : -1);
    /* a MAP_PRIVATE mapping of the same file is not the region's memory */
    char path[4096];
    snprintf(path, sizeof path, "%s/regions/%s/data", mount, name);
    int fd = open(path, O_RDONLY);
    void *priv = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    EXPECT("map_private", cdmfs_device_access("gpu0", CDMFS_READ, priv, len, 0, NULL));
    munmap(priv, len);
    EXPECT("ok", cdmfs_device_access("gpu0", CDMFS_TOUCH, buf, len, 0, NULL));
    free(heap);
    munmap(buf, len);
    return 0;
}

static int unpriv(const char *mount, const char *name)
{
    size_t n = 4, len = n * PAGE;
    char *buf = (char *)map_region(mount, name, n, NULL, MAP_SHARED);
    char where_buf[64];
    memset(buf, 1, len);
    if (cdmfs_migrate(buf + 2 * PAGE, PAGE, "gpu0", NULL) != 0)
        die("migrate to gpu0");
    where("gpu-page", buf + 2 * PAGE);
    where("cpu-page", buf);
    if (cdmfs_migrate(buf, PAGE, "cdm0", NULL) != 0)
        die("migrate to cdm0");
    EXPECT("mixed", cdmfs_where(buf, where_buf, sizeof where_buf));
    munmap(buf, len);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 6 && !strcmp(argv[1], "seed"))
        return seed(argv[2], argv[3], argv[4], strtoul(argv[5], NULL, 0), argc > 6 ? argv[6] : NULL);
    if (argc == 5 && !strcmp(argv[1], "split"))
        return split(argv[2], argv[3], argv[4]);
    if (argc == 4 && !strcmp(argv[1], "errors"))
        return errors(argv[2], argv[3]);
    if (argc == 4 && !strcmp(argv[1], "unpriv"))
        return unpriv(argv[2], argv[3]);
    fprintf(stderr, "usage: capi seed MOUNT REGION DEVICE NPAGES [FIRST_TARGET] | split MOUNT R1 R2 | errors MOUNT R | unpriv MOUNT R\n");
    return 1;
}
