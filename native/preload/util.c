/* Raw system calls, strings and nodemasks that never allocate. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "preload.h"

long cdm_raw(long n, long a, long b, long c, long d, long e, long f)
{
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory");
    return x0;
#else
#error "cdmfs run: raw system calls are written for x86_64 and aarch64"
#endif
}

long cdm_ret(long r)
{
    if (r < 0 && r > -4096) {
        errno = (int)-r;
        return -1;
    }
    return r;
}

size_t cdm_strlcpy(char *dst, const char *src, size_t size)
{
    size_t i = 0;
    for (; src[i] && i + 1 < size; i++)
        dst[i] = src[i];
    if (size)
        dst[i] = 0;
    while (src[i])
        i++;
    return i;
}

size_t cdm_strlcat(char *dst, const char *src, size_t size)
{
    size_t n = 0;
    while (n < size && dst[n])
        n++;
    return n + cdm_strlcpy(dst + n, src, size > n ? size - n : 0);
}

char *cdm_utoa(char *buf, unsigned long v)
{
    char tmp[24];
    int i = 0, j = 0;
    do {
        tmp[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        buf[j++] = tmp[--i];
    buf[j] = 0;
    return buf;
}

int cdm_read_file(const char *path, char *buf, size_t size)
{
    long fd = RAW4(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0)
        return (int)fd;
    size_t got = 0;
    while (got + 1 < size) {
        long n = RAW3(SYS_read, fd, buf + got, size - 1 - got);
        if (n < 0) {
            RAW1(SYS_close, fd);
            return (int)n;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    buf[got] = 0;
    RAW1(SYS_close, fd);
    return (int)got;
}

int cdm_write_fd(int fd, const char *text)
{
    size_t n = 0;
    while (text[n])
        n++;
    long r;
    do                                          /* a signal must not fail a control write */
        r = RAW4(SYS_pwrite64, fd, text, n, 0);
    while (r == -EINTR);
    return r < 0 ? (int)r : 0;
}

/* ---------------------------------------------------------------- nodemasks */

int nm_isset(const struct nodemask *m, int n)
{
    return n >= 0 && n < MAX_NODES && (m->w[n / 64] >> (n % 64)) & 1;
}

void nm_set(struct nodemask *m, int n)
{
    if (n >= 0 && n < MAX_NODES)
        m->w[n / 64] |= 1ULL << (n % 64);
}

int nm_empty(const struct nodemask *m)
{
    for (int i = 0; i < MASK_WORDS; i++)
        if (m->w[i])
            return 0;
    return 1;
}

int nm_weight(const struct nodemask *m)
{
    int c = 0;
    for (int i = 0; i < MASK_WORDS; i++)
        c += __builtin_popcountll(m->w[i]);
    return c;
}

int nm_next(const struct nodemask *m, int n)
{
    for (int i = n + 1; i < MAX_NODES; i++)
        if (nm_isset(m, i))
            return i;
    return -1;
}

int nm_first(const struct nodemask *m)
{
    return nm_next(m, -1);
}

int nm_parse(const char *s, struct nodemask *m)
{
    for (int i = 0; i < MASK_WORDS; i++)
        m->w[i] = 0;
    while (*s == ' ' || *s == '\t')
        s++;
    while (*s && *s != '\n') {
        long a = 0, b;
        if (*s < '0' || *s > '9')
            return -EINVAL;
        while (*s >= '0' && *s <= '9')
            a = a * 10 + (*s++ - '0');
        b = a;
        if (*s == '-') {
            s++;
            b = 0;
            if (*s < '0' || *s > '9')
                return -EINVAL;
            while (*s >= '0' && *s <= '9')
                b = b * 10 + (*s++ - '0');
        }
        if (a > b || b >= MAX_NODES)
            return -EINVAL;
        for (long n = a; n <= b; n++)
            nm_set(m, (int)n);
        if (*s == ',')
            s++;
        else if (*s && *s != '\n')
            return -EINVAL;
    }
    return 0;
}

char *nm_format(const struct nodemask *m, char *buf, size_t size)
{
    char num[24];
    buf[0] = 0;
    for (int n = nm_first(m); n >= 0;) {
        int e = n;
        while (nm_isset(m, e + 1))
            e++;
        if (buf[0])
            cdm_strlcat(buf, ",", size);
        cdm_strlcat(buf, cdm_utoa(num, (unsigned long)n), size);
        if (e > n) {
            cdm_strlcat(buf, "-", size);
            cdm_strlcat(buf, cdm_utoa(num, (unsigned long)e), size);
        }
        n = nm_next(m, e);
    }
    return buf;
}

/* "start-end perms offset dev inode   path" */
static void parse_mapping(char *line, struct cdm_mapping *out)
{
    char *p;
    out->start = strtoul(line, &p, 16);
    out->end = strtoul(p + 1, &p, 16);
    out->prot = (p[1] == 'r' ? PROT_READ : 0) | (p[2] == 'w' ? PROT_WRITE : 0) |
                (p[3] == 'x' ? PROT_EXEC : 0);
    out->offset = strtoul(p + 6, &p, 16);
    for (int field = 0; field < 2 && *p; field++) {     /* dev, inode */
        while (*p == ' ')
            p++;
        while (*p && *p != ' ')
            p++;
    }
    while (*p == ' ')
        p++;
    out->path = p;
}

int cdm_for_each_mapping(char *buf, size_t size,
                         int (*fn)(const struct cdm_mapping *, void *), void *arg)
{
    long mfd = RAW4(SYS_openat, AT_FDCWD, "/proc/self/maps", O_RDONLY | O_CLOEXEC, 0);
    if (mfd < 0)
        return (int)mfd;
    size_t have = 0;
    int ret = 0;
    while (!ret) {
        long got = RAW3(SYS_read, mfd, buf + have, size - 1 - have);
        if (got <= 0)
            break;
        have += (size_t)got;
        buf[have] = 0;
        char *line = buf;
        for (char *nl; !ret && (nl = strchr(line, '\n')); line = nl + 1) {
            *nl = 0;
            struct cdm_mapping m;
            parse_mapping(line, &m);
            ret = fn(&m, arg);
        }
        have = strlen(line);
        memmove(buf, line, have);
    }
    RAW1(SYS_close, mfd);
    return ret;
}
