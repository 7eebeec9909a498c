/*
 * libcdmfs: the C API of cdmfs.h.  A thin client over the mount's files, as
 * cdmfs/client.py is for Python: it finds which region a pointer is in from
 * /proc/self/maps and writes the requests a shell user would write.
 */
#define _GNU_SOURCE
#include "cdmfs.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define PAGE ((uint64_t)CDMFS_PAGE_SIZE)
#define API __attribute__((visibility("default")))

/* pagemap bits (Documentation/admin-guide/mm/pagemap.rst), as the mount writes them */
#define PM_PFN_MASK ((1ULL << 55) - 1)
#define PM_SWAP (1ULL << 62)
#define PM_PRESENT (1ULL << 63)
#define MAX_SWAPFILES_SHIFT 5
#define SWP_HWPOISON 24

static __thread char last_error[512];

API const char *cdmfs_last_error(void)
{
    return last_error;
}

/* Records why this thread's call fails; sets errno; returns -1. */
static int fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    errno = err;
    return -1;
}

/* ---- files ---------------------------------------------------------------- */

/* The whole file, NUL-terminated, in a malloc'd buffer; NULL and errno on failure. */
static char *slurp(const char *path, size_t *lenp)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (cap - len < 2) {
            char *bigger = realloc(buf, cap * 2);
            if (!bigger) {
                free(buf);
                buf = NULL;
                errno = ENOMEM;
                break;
            }
            buf = bigger;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + len, cap - len - 1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            free(buf);
            buf = NULL;
            errno = e;
            break;
        }
        if (r == 0) {
            buf[len] = 0;
            if (lenp)
                *lenp = len;
            break;
        }
        len += (size_t)r;
    }
    int e = errno;
    close(fd);
    errno = e;
    return buf;
}

/* A small attribute file's first line, without the newline; -1 and errno on failure. */
static int read_line(const char *path, char *out, size_t size)
{
    char *text = slurp(path, NULL);
    if (!text)
        return -1;
    snprintf(out, size, "%s", text);
    free(text);
    out[strcspn(out, "\n")] = 0;
    return 0;
}

/* One write() of the whole request, as echo does; the control file's errno on failure. */
static int write_request(int fd, const char *req)
{
    size_t n = strlen(req);
    ssize_t w;
    do
        w = write(fd, req, n);
    while (w < 0 && errno == EINTR);
    if (w < 0)
        return -1;
    if ((size_t)w != n) {
        errno = EIO;
        return -1;
    }
    return 0;
}

/* Writes req to a transaction file and reads the answer on the same open file
 * (write, lseek 0, read), as cdmfs.transact does. */
static int transact(const char *path, const char *req, char *out, size_t size)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    int rc = write_request(fd, req);
    if (rc == 0 && lseek(fd, 0, SEEK_SET) < 0)
        rc = -1;
    while (rc == 0) {
        ssize_t r = read(fd, out + len, size - 1 - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            rc = -1;
        if (r <= 0 || len + (size_t)r >= size - 1) {
            len += r > 0 ? (size_t)r : 0;
            break;
        }
        len += (size_t)r;
    }
    out[len] = 0;
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

static int write_file(const char *path, const char *req)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = write_request(fd, req);
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

/* ---- pointers to regions --------------------------------------------------- */

/* A piece of a pointer range: bytes [off, off+len) of one region's data. */
struct piece {
    char mount[PATH_MAX];   /* the mount point, as the maps line names it */
    char name[72];          /* the region */
    uint64_t off, len;
};

/* Whether PATH (a maps line's file) is a cdmfs region's data file, the one
 * with this device and inode: fills mount and name. */
static int region_of_path(const char *path, unsigned maj, unsigned min, unsigned long ino,
                          char *mount, size_t msize, char *name, size_t nsize)
{
    size_t n = strlen(path);
    if (path[0] != '/' || n < 6 || strcmp(path + n - 5, "/data") != 0)
        return 0;
    const char *end = path + n - 5;                 /* MOUNT/regions/NAME| */
    const char *slash = end;
    while (slash > path && slash[-1] != '/')
        slash--;
    size_t nlen = (size_t)(end - slash);            /* NAME */
    if (nlen == 0 || nlen >= nsize || slash - path < (ptrdiff_t)sizeof "/regions/" - 1)
        return 0;
    const char *regions = slash - (sizeof "/regions/" - 1);
    if (strncmp(regions, "/regions/", sizeof "/regions/" - 1) != 0)
        return 0;
    size_t mlen = (size_t)(regions - path);
    if (mlen >= msize)
        return 0;
    memcpy(mount, path, mlen);
    mount[mlen] = 0;
    if (mlen == 0)
        strcpy(mount, "/");
    memcpy(name, slash, nlen);
    name[nlen] = 0;
    /* The file is the one mapped (not a namesake), and the mount is cdmfs's. */
    struct stat st;
    char probe[PATH_MAX + 16];
    if (stat(path, &st) != 0 || st.st_ino != ino || major(st.st_dev) != maj || minor(st.st_dev) != min)
        return 0;
    snprintf(probe, sizeof probe, "%s/devices", mlen ? mount : "");
    if (stat(probe, &st) != 0 || !S_ISDIR(st.st_mode) || major(st.st_dev) != maj || minor(st.st_dev) != min)
        return 0;
    return 1;
}

/* Cuts [addr, addr+len) into pieces of regions' data, from /proc/self/maps.
 * Adjacent mappings of consecutive bytes of one region are one piece.
 * Returns the number of pieces (*out malloc'd), or -1 (EFAULT: a byte of the
 * range is not in a MAP_SHARED mapping of a region's data). */
static int resolve(const void *addr, size_t len, struct piece **out)
{
    uintptr_t cur = (uintptr_t)addr, end = cur + len;
    *out = NULL;
    if (end < cur)
        return fail(EFAULT, "the range %p + %zu wraps around the address space", addr, len);
    char *maps = slurp("/proc/self/maps", NULL);
    if (!maps)
        return fail(errno, "cannot read /proc/self/maps: %s", strerror(errno));
    struct piece *pieces = NULL;
    int n = 0, cap = 0;
    char last_path[PATH_MAX + 64] = "";
    int last_ok = 0;
    char mount[PATH_MAX], name[72];
    for (char *line = maps, *next; cur < end && *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        else
            next = line + strlen(line);
        unsigned long long start, stop, offset;
        unsigned maj, min;
        unsigned long ino;
        char perms[8];
        int at = 0;
        if (sscanf(line, "%llx-%llx %7s %llx %x:%x %lu %n", &start, &stop, perms, &offset, &maj, &min,
                   &ino, &at) < 7)
            continue;
        if (stop <= cur)
            continue;
        if (start > cur)
            break;                                  /* a hole in the range */
        const char *path = line + at;
        if (strcmp(path, last_path) != 0) {
            snprintf(last_path, sizeof last_path, "%s", path);
            last_ok = region_of_path(path, maj, min, ino, mount, sizeof mount, name, sizeof name);
        }
        if (!last_ok || perms[3] != 's') {
            free(maps);
            free(pieces);
            return fail(EFAULT, "%#" PRIxPTR " is not in a MAP_SHARED mapping of a cdmfs region's data (%s%s)",
                        cur, *path ? path : "anonymous memory",
                        last_ok ? ", mapped MAP_PRIVATE" : "");
        }
        uint64_t off = offset + (cur - start);
        uintptr_t to = stop < end ? (uintptr_t)stop : end;
        struct piece *prev = n ? &pieces[n - 1] : NULL;
        if (prev && prev->off + prev->len == off && !strcmp(prev->name, name) && !strcmp(prev->mount, mount)) {
            prev->len += to - cur;
        } else {
            if (n == cap) {
                cap = cap ? 2 * cap : 4;
                struct piece *more = realloc(pieces, (size_t)cap * sizeof *pieces);
                if (!more) {
                    free(maps);
                    free(pieces);
                    return fail(ENOMEM, "out of memory");
                }
                pieces = more;
            }
            struct piece *p = &pieces[n++];
            snprintf(p->mount, sizeof p->mount, "%s", mount);
            snprintf(p->name, sizeof p->name, "%s", name);
            p->off = off;
            p->len = to - cur;
        }
        cur = to;
    }
    free(maps);
    if (cur < end) {
        free(pieces);
        return fail(EFAULT, "%#" PRIxPTR " is not mapped", cur);
    }
    *out = pieces;
    return n;
}

/* The path of a file of a piece's region or mount. */
static int region_file(char *out, size_t size, const struct piece *p, const char *file)
{
    if ((size_t)snprintf(out, size, "%s/regions/%s/%s", strcmp(p->mount, "/") ? p->mount : "", p->name, file) >= size)
        return fail(ENAMETOOLONG, "path too long: %s/regions/%s/%s", p->mount, p->name, file);
    return 0;
}

static int mount_file(char *out, size_t size, const struct piece *p, const char *file)
{
    if ((size_t)snprintf(out, size, "%s/%s", strcmp(p->mount, "/") ? p->mount : "", file) >= size)
        return fail(ENAMETOOLONG, "path too long: %s/%s", p->mount, file);
    return 0;
}

/* A word of a request: no whitespace, not empty. */
static int is_word(const char *s)
{
    if (!s || !*s)
        return 0;
    for (; *s; s++)
        if (isspace((unsigned char)*s))
            return 0;
    return 1;
}

/* Whether node id `nid` is in a node list ("0-1,3"). */
static int in_nodelist(const char *list, long nid)
{
    const char *s = list;
    while (*s) {
        char *e;
        long a = strtol(s, &e, 10), b = a;
        if (e == s)
            return 0;
        if (*e == '-') {
            s = e + 1;
            b = strtol(s, &e, 10);
        }
        if (a <= nid && nid <= b)
            return 1;
        s = *e == ',' ? e + 1 : e;
        if (*e != ',')
            break;
    }
    return 0;
}

/* A target as the mount's migrate file spells it: "cpu" is the first node
 * with CPUs and memory, with `coherent` a coherent device's name is its node
 * (a look-up: migrate tries the word as it is first); the rest as is. */
static int mount_target(const struct piece *p, const char *target, char *out, size_t size, int coherent)
{
    if (!is_word(target))
        return fail(EINVAL, "bad target \"%s\"", target ? target : "(null)");
    char path[PATH_MAX + 128], line[4096];
    if (!strcmp(target, "cpu")) {
        char mem[4096];
        if (mount_file(path, sizeof path, p, "sys/devices/system/node/has_cpu") < 0)
            return -1;
        if (read_line(path, line, sizeof line) < 0)
            return fail(errno, "%s: %s", path, strerror(errno));
        if (mount_file(path, sizeof path, p, "sys/devices/system/node/has_memory") < 0)
            return -1;
        if (read_line(path, mem, sizeof mem) < 0)
            return fail(errno, "%s: %s", path, strerror(errno));
        for (const char *s = line; *s;) {          /* the first node in both lists */
            char *e;
            long a = strtol(s, &e, 10), b = a;
            if (e == s)
                break;
            if (*e == '-')
                b = strtol(e + 1, &e, 10);
            for (long nid = a; nid <= b; nid++)
                if (in_nodelist(mem, nid)) {
                    snprintf(out, size, "node:%ld", nid);
                    return 0;
                }
            if (*e != ',')
                break;
            s = e + 1;
        }
        return fail(ENODEV, "no node has both CPUs and memory");
    }
    if (coherent && !strchr(target, ':') && !isdigit((unsigned char)target[0]) && !strchr(target, '/')) {
        char dev[PATH_MAX + 128];
        snprintf(dev, sizeof dev, "devices/%s/type", target);
        if (mount_file(path, sizeof path, p, dev) < 0)
            return -1;
        if (read_line(path, line, sizeof line) == 0 && !strcmp(line, "coherent")) {
            snprintf(dev, sizeof dev, "devices/%s/node", target);
            if (mount_file(path, sizeof path, p, dev) < 0)
                return -1;
            if (read_line(path, line, sizeof line) == 0 && isdigit((unsigned char)line[0]) &&
                (size_t)snprintf(out, size, "node:%s", line) < size)
                return 0;
        }
    }
    snprintf(out, size, "%s", target);
    return 0;
}

/* ---- device access ---------------------------------------------------------- */

static const char *const op_words[] = {"read", "write", "add", "touch"};

/* crc32_combine of zlib: the CRC of A||B from crc(A), crc(B) and len(B). */
static uint32_t gf2_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    for (; vec; vec >>= 1, mat++)
        if (vec & 1)
            sum ^= *mat;
    return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_times(mat, mat[n]);
}

static uint32_t crc32_combine(uint32_t crc1, uint32_t crc2, uint64_t len2)
{
    uint32_t even[32], odd[32];
    if (len2 == 0)
        return crc1;
    odd[0] = 0xedb88320u;                   /* the operator for one zero bit */
    for (int n = 1; n < 32; n++)
        odd[n] = 1u << (n - 1);
    gf2_square(even, odd);                  /* two zero bits */
    gf2_square(odd, even);                  /* four */
    do {                                    /* len2 zero bytes onto crc1 */
        gf2_square(even, odd);
        if (len2 & 1)
            crc1 = gf2_times(even, crc1);
        len2 >>= 1;
        if (!len2)
            break;
        gf2_square(odd, even);
        if (len2 & 1)
            crc1 = gf2_times(odd, crc1);
        len2 >>= 1;
    } while (len2);
    return crc1 ^ crc2;
}

/* Adds an access file's result line ("ok bytes=... crc32=0x...") to res. */
static int parse_access(const char *text, struct cdmfs_access_result *res, uint64_t len, int first)
{
    if (strncmp(text, "ok", 2) != 0 || (text[2] != ' ' && text[2] != '\n' && text[2] != 0))
        return fail(EIO, "unexpected answer from the device: %.200s", text);
    struct cdmfs_access_result one = {0};
    int have_crc = 0;
    for (const char *s = text + 2; *s;) {
        while (*s == ' ' || *s == '\n')
            s++;
        const char *eq = strchr(s, '=');
        if (!*s || !eq)
            break;
        size_t klen = (size_t)(eq - s);
        char *e;
        unsigned long long v = strtoull(eq + 1, &e, 0);
#define KEY(k) (klen == sizeof k - 1 && !strncmp(s, k, klen))
        if (KEY("bytes"))
            one.bytes = v;
        else if (KEY("faults"))
            one.faults = v;
        else if (KEY("migrated"))
            one.migrated = v;
        else if (KEY("local_bytes"))
            one.local_bytes = v;
        else if (KEY("remote_bytes"))
            one.remote_bytes = v;
        else if (KEY("modeled_ns"))
            one.modeled_ns = v;
        else if (KEY("crc32")) {
            one.crc32 = (uint32_t)v;
            have_crc = 1;
        }
#undef KEY
        s = e;
        while (*s && *s != ' ' && *s != '\n')
            s++;
    }
    res->bytes += one.bytes;
    res->faults += one.faults;
    res->migrated += one.migrated;
    res->local_bytes += one.local_bytes;
    res->remote_bytes += one.remote_bytes;
    res->modeled_ns += one.modeled_ns;
    if (have_crc)
        res->crc32 = first ? one.crc32 : crc32_combine(res->crc32, one.crc32, len);
    return 0;
}

API int cdmfs_device_access(const char *device, int op, void *addr, size_t len, uint64_t arg,
                            struct cdmfs_access_result *res)
{
    struct cdmfs_access_result sum = {0};
    if (res)
        *res = sum;
    if (op < CDMFS_READ || op > CDMFS_TOUCH)
        return fail(EINVAL, "unknown op %d (CDMFS_READ, CDMFS_WRITE, CDMFS_ADD or CDMFS_TOUCH)", op);
    if ((uintptr_t)addr % PAGE || len % PAGE)
        return fail(EINVAL, "a device access takes a page-aligned range (%p + %zu)", addr, len);
    if (!is_word(device) || strchr(device, '/') || !strcmp(device, ".") || !strcmp(device, ".."))
        return fail(ENODEV, "bad device name \"%s\"", device ? device : "(null)");
    if (len == 0)
        return 0;
    struct piece *pieces;
    int n = resolve(addr, len, &pieces);
    if (n < 0)
        return -1;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        struct piece *p = &pieces[i];
        char path[PATH_MAX + 128], dev[PATH_MAX + 64], req[256], answer[1024];
        struct stat st;
        snprintf(dev, sizeof dev, "devices/%s", device);
        if ((rc = mount_file(path, sizeof path, p, dev)) < 0)
            break;
        if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
            rc = fail(ENODEV, "no device %s in %s", device, p->mount);
            break;
        }
        snprintf(dev, sizeof dev, "devices/%s/access", device);
        if ((rc = mount_file(path, sizeof path, p, dev)) < 0)
            break;
        if (op == CDMFS_WRITE || op == CDMFS_ADD)
            snprintf(req, sizeof req, "%s %s %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", op_words[op], p->name,
                     p->off, p->len, arg);
        else
            snprintf(req, sizeof req, "%s %s %" PRIu64 " %" PRIu64 "\n", op_words[op], p->name, p->off, p->len);
        if (transact(path, req, answer, sizeof answer) < 0) {
            int e = errno == ENOENT ? ENODEV : errno;
            rc = fail(e, "%s on %s: %s", device, p->name, strerror(errno));
            break;
        }
        rc = parse_access(answer, &sum, p->len, i == 0);
    }
    free(pieces);
    if (res)
        *res = sum;
    return rc;
}

/* ---- migration, prefetch, advice ------------------------------------------- */

/* The pages holding [addr, addr+len), as pieces. */
static int resolve_pages(void *addr, size_t len, struct piece **pieces)
{
    uintptr_t a = (uintptr_t)addr, e = a + len;
    if (e < a)
        return fail(EFAULT, "the range %p + %zu wraps around the address space", addr, len);
    uintptr_t first = a & ~(uintptr_t)(PAGE - 1);
    uintptr_t last = (e + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
    if (last < e)
        return fail(EFAULT, "the range %p + %zu wraps around the address space", addr, len);
    return resolve((void *)first, last - first, pieces);
}

static int migrate_piece(const struct piece *p, const char *target, struct cdmfs_migrate_result *sum)
{
    char path[PATH_MAX + 128], tgt[256], req[512], answer[4096];
    if (mount_target(p, target, tgt, sizeof tgt, 0) < 0)
        return -1;
    if (region_file(path, sizeof path, p, "migrate") < 0)
        return -1;
    snprintf(req, sizeof req, "%" PRIu64 " %" PRIu64 " %s\n", p->off, p->len, tgt);
    int rc = transact(path, req, answer, sizeof answer);
    if (rc < 0 && errno == EINVAL) {        /* not a word of the file: a coherent device's name? */
        char node[256];
        if (mount_target(p, target, node, sizeof node, 1) == 0 && strcmp(node, tgt)) {
            snprintf(tgt, sizeof tgt, "%s", node);
            snprintf(req, sizeof req, "%" PRIu64 " %" PRIu64 " %s\n", p->off, p->len, tgt);
            rc = transact(path, req, answer, sizeof answer);
        } else {
            errno = EINVAL;
        }
    }
    if (rc < 0)
        return fail(errno, "migrate %" PRIu64 " %" PRIu64 " of %s to %s: %s", p->off, p->len, p->name, tgt,
                    strerror(errno));
    uint64_t v[3] = {0, 0, 0};
    static const char *const keys[] = {"requested ", "migrated ", "skipped "};
    for (const char *line = answer; *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : "")
        for (int k = 0; k < 3; k++)
            if (!strncmp(line, keys[k], strlen(keys[k])))
                v[k] = strtoull(line + strlen(keys[k]), NULL, 10);
    sum->requested += v[0];
    sum->migrated += v[1];
    sum->skipped += v[2];
    return 0;
}

API int cdmfs_migrate(void *addr, size_t len, const char *target, struct cdmfs_migrate_result *res)
{
    struct cdmfs_migrate_result sum = {0, 0, 0};
    if (res)
        *res = sum;
    if (!is_word(target))
        return fail(EINVAL, "bad target \"%s\"", target ? target : "(null)");
    if (len == 0)
        return 0;
    struct piece *pieces;
    int n = resolve_pages(addr, len, &pieces);
    if (n < 0)
        return -1;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++)
        rc = migrate_piece(&pieces[i], target, &sum);
    free(pieces);
    if (res)
        *res = sum;
    return rc;
}

static int advise_piece(const struct piece *p, const char *advice)
{
    char path[PATH_MAX + 128], req[512];
    if (region_file(path, sizeof path, p, "advise") < 0)
        return -1;
    snprintf(req, sizeof req, "%" PRIu64 " %" PRIu64 " %s\n", p->off, p->len, advice);
    if (write_file(path, req) < 0)
        return fail(errno, "advise %s on %s: %s", advice, p->name, strerror(errno));
    return 0;
}

API int cdmfs_advise(void *addr, size_t len, const char *advice)
{
    if (!is_word(advice) || strlen(advice) > 200)
        return fail(EINVAL, "bad advice \"%s\"", advice ? advice : "(null)");
    if (len == 0)
        return 0;
    struct piece *pieces;
    int n = resolve_pages(addr, len, &pieces);
    if (n < 0)
        return -1;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++)
        rc = advise_piece(&pieces[i], advice);
    free(pieces);
    return rc;
}

API int cdmfs_prefetch(void *addr, size_t len, const char *target)
{
    if (!is_word(target))
        return fail(EINVAL, "bad target \"%s\"", target ? target : "(null)");
    if (len == 0)
        return 0;
    struct piece *pieces;
    int n = resolve_pages(addr, len, &pieces);
    if (n < 0)
        return -1;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        char tgt[256], advice[300];
        struct cdmfs_migrate_result ignored = {0, 0, 0};
        if ((rc = mount_target(&pieces[i], target, tgt, sizeof tgt, 1)) < 0)
            break;
        snprintf(advice, sizeof advice, "prefetch:%s", tgt);
        rc = advise_piece(&pieces[i], advice);
        if (rc < 0 && errno == EINVAL)      /* a mount without the advice: migrate now */
            rc = migrate_piece(&pieces[i], tgt, &ignored);
    }
    free(pieces);
    return rc;
}

/* ---- where a page lives ------------------------------------------------------ */

/* The node whose memory blocks hold frame pfn, or -1 (errno). */
static int node_of_pfn(const struct piece *p, uint64_t pfn)
{
    char path[PATH_MAX + 128], line[64];
    if (mount_file(path, sizeof path, p, "sys/devices/system/memory/block_size_bytes") < 0)
        return -1;
    if (read_line(path, line, sizeof line) < 0)
        return fail(errno, "%s: %s", path, strerror(errno));
    uint64_t block_size = strtoull(line, NULL, 16);
    if (!block_size)
        return fail(EIO, "%s: no block size", path);
    uint64_t block = pfn * PAGE / block_size;
    if (mount_file(path, sizeof path, p, "sys/devices/system/node") < 0)
        return -1;
    DIR *d = opendir(path);
    if (!d)
        return fail(errno, "%s: %s", path, strerror(errno));
    int found = -1;
    for (struct dirent *de; found < 0 && (de = readdir(d));) {
        char *e;
        if (strncmp(de->d_name, "node", 4) || !isdigit((unsigned char)de->d_name[4]))
            continue;
        long nid = strtol(de->d_name + 4, &e, 10);
        if (*e)
            continue;
        char link[PATH_MAX + 256];
        struct stat st;
        if ((size_t)snprintf(link, sizeof link, "%s/%s/memory%" PRIu64, path, de->d_name, block) < sizeof link &&
            lstat(link, &st) == 0)
            found = (int)nid;
    }
    closedir(d);
    if (found < 0)
        return fail(EIO, "frame %#" PRIx64 " is in no node's memory blocks", pfn);
    return found;
}

/* The device whose private memory holds frame pfn, in out. */
static int device_of_pfn(const struct piece *p, uint64_t pfn, char *out, size_t size)
{
    char path[PATH_MAX + 128];
    if (mount_file(path, sizeof path, p, "devices") < 0)
        return -1;
    DIR *d = opendir(path);
    if (!d)
        return fail(errno, "%s: %s", path, strerror(errno));
    int found = 0;
    for (struct dirent *de; !found && (de = readdir(d));) {
        char file[PATH_MAX + 512], line[128];
        unsigned long long start, stop;
        if (de->d_name[0] == '.')
            continue;
        if ((size_t)snprintf(file, sizeof file, "%s/%s/type", path, de->d_name) >= sizeof file)
            continue;
        if (read_line(file, line, sizeof line) < 0 || strcmp(line, "private"))
            continue;
        if ((size_t)snprintf(file, sizeof file, "%s/%s/resource", path, de->d_name) >= sizeof file)
            continue;
        if (read_line(file, line, sizeof line) < 0 || sscanf(line, "%llx %llx", &start, &stop) != 2)
            continue;
        if (start <= pfn * PAGE && pfn * PAGE <= stop && strlen(de->d_name) < size) {
            strcpy(out, de->d_name);
            found = 1;
        }
    }
    closedir(d);
    if (!found)
        return fail(EIO, "frame %#" PRIx64 " is in no device's private memory", pfn);
    return 0;
}

/* Without privilege pagemap shows no frames: the answer from numa_maps's line
 * for the page, when that policy range holds pages in one place only.
 * present: the page is CPU-present (a node), else device-private or poisoned. */
static int where_unprivileged(const struct piece *p, int present, char *out, size_t size)
{
    char path[PATH_MAX + 128];
    if (region_file(path, sizeof path, p, "numa_maps") < 0)
        return -1;
    char *text = slurp(path, NULL);
    if (!text)
        return fail(errno, "%s: %s", path, strerror(errno));
    char *mine = NULL;
    for (char *line = text; *line;) {               /* the last line starting at or before off */
        if (strtoull(line, NULL, 16) <= p->off)
            mine = line;
        char *nl = strchr(line, '\n');
        if (!nl)
            break;
        *nl = 0;
        line = nl + 1;
    }
    int places = 0, nid = -1;
    char dev[72] = "";
    char *save = NULL;
    for (char *w = mine ? strtok_r(mine, " ", &save) : NULL; w; w = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(w, '=');
        if (!eq || strtoull(eq + 1, NULL, 10) == 0)
            continue;
        if (present && w[0] == 'N' && isdigit((unsigned char)w[1])) {
            places++;
            nid = atoi(w + 1);
        } else if (!present && !strncmp(w, "private:", 8) && (size_t)(eq - w - 8) < sizeof dev) {
            places++;
            memcpy(dev, w + 8, (size_t)(eq - w - 8));
            dev[eq - w - 8] = 0;
        }
    }
    free(text);
    if (!present) {
        if (region_file(path, sizeof path, p, "stat") < 0)
            return -1;
        char *st = slurp(path, NULL), *k = st ? strstr(st, "\npoisoned ") : NULL;
        long poisoned = k ? atol(k + 10) : 0;
        free(st);
        if (places == 0 && poisoned > 0) {
            snprintf(out, size, "poisoned");
            return CDMFS_WHERE_OTHER;
        }
        if (places != 1 || poisoned > 0)
            return fail(EACCES, "only root sees where this page is (pagemap frames)");
        snprintf(out, size, "%s", dev);
        return CDMFS_WHERE_OTHER;
    }
    if (places != 1)
        return fail(EACCES, "only root sees on which node this page is (pagemap frames)");
    snprintf(out, size, "node:%d", nid);
    return nid;
}

API int cdmfs_where(const void *addr, char *buf, size_t buflen)
{
    struct piece *pieces;
    int n = resolve((const void *)((uintptr_t)addr & ~(uintptr_t)(PAGE - 1)), PAGE, &pieces);
    if (n < 0)
        return -1;
    struct piece p = pieces[0];
    free(pieces);
    char path[PATH_MAX + 128], where[80];
    if (region_file(path, sizeof path, &p, "pagemap") < 0)
        return -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(errno, "%s: %s", path, strerror(errno));
    uint64_t entry = 0;
    ssize_t r = pread(fd, &entry, sizeof entry, (off_t)(p.off / PAGE * 8));
    int e = errno;
    close(fd);
    if (r < 0)
        return fail(e, "%s: %s", path, strerror(e));
    if (r != sizeof entry)
        return fail(EFAULT, "%p is beyond the end of region %s", addr, p.name);
    int rc;
    uint64_t frame = entry & PM_PFN_MASK;
    int privileged = geteuid() == 0;
    if (entry & PM_PRESENT) {
        rc = privileged ? node_of_pfn(&p, frame) : where_unprivileged(&p, 1, where, sizeof where);
        if (rc >= 0 && privileged)
            snprintf(where, sizeof where, "node:%d", rc);
    } else if (entry & PM_SWAP) {
        if (!privileged)
            rc = where_unprivileged(&p, 0, where, sizeof where);
        else if ((frame & ((1u << MAX_SWAPFILES_SHIFT) - 1)) == SWP_HWPOISON) {
            snprintf(where, sizeof where, "poisoned");
            rc = CDMFS_WHERE_OTHER;
        } else {
            rc = device_of_pfn(&p, frame >> MAX_SWAPFILES_SHIFT, where, sizeof where);
            if (rc == 0)
                rc = CDMFS_WHERE_OTHER;
        }
    } else {
        snprintf(where, sizeof where, "none");
        rc = CDMFS_WHERE_OTHER;
    }
    if (rc == -1)
        return -1;
    if (buf) {
        if (strlen(where) >= buflen)
            return fail(ERANGE, "\"%s\" does not fit in %zu bytes", where, buflen);
        strcpy(buf, where);
    }
    return rc;
}
