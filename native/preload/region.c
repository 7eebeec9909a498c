/* The process's region: its private anonymous memory as mappings of
 * MOUNT/regions/PID/data.
 *
 * Each private anonymous mmap (of at least CDMFS_RUN_MIN_SIZE bytes) becomes
 * a MAP_SHARED mapping of the region's data file at file offsets of its own;
 * a table of extents (address range -> offset) keeps where.  Offsets that
 * munmap, MAP_FIXED or madvise(MADV_DONTNEED/FREE/REMOVE) give up are freed
 * in the daemon (advise "remove": the pages go and read zero again) and
 * reused.  The data file is grown sparsely by ftruncate.
 *
 * The region is created at the first mapping (allocators map before any
 * constructor runs) and named after the pid; the daemon removes it when the
 * process has ended (owner_pid, a pidfd).  exec keeps the pid: the new image
 * takes the region over, emptied.  fork: the parent copies its region into a
 * snapshot before the fork, and the child maps the snapshot over its copies
 * of the mappings, so each has its own private memory.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "preload.h"

#define INITIAL_SIZE (64UL << 30)      /* sparse: costs nothing until touched */

struct cdm_state cdm = {
    .fd_data = -1, .fd_mbind = -1, .fd_migrate = -1, .fd_advise = -1, .fd_policy = -1,
};
__thread int cdm_in_lib __attribute__((tls_model("initial-exec")));

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

void cdm_lock(void) { pthread_mutex_lock(&lock); }
void cdm_unlock(void) { pthread_mutex_unlock(&lock); }

/* ------------------------------------------------------------ tables */

struct extent { uintptr_t start, end; uint64_t off; };
struct range { uint64_t off, len; };

static struct extent *ext;
static size_t next_, ext_cap;
static struct range *freel;
static size_t nfree, free_cap;
static uint64_t bump;                   /* offsets at and past this are unused */
static uint64_t fsize;                  /* the data file's size */

/* Where the tables go when that is free: away from the program's own
 * mappings, so that a table never fills a hole the program just unmapped
 * (which would then show up as mapped memory in its place). */
#define TABLE_HINT 0x5f0000000000UL

/* Grows a table kept in memory of its own (raw mmap, never the region). */
static int grow(void **table, size_t *cap, size_t elem)
{
    static uintptr_t cursor = TABLE_HINT;
    size_t ncap = *cap ? *cap * 2 : 256;
    size_t bytes = (ncap * elem + PAGE - 1) & ~(PAGE - 1);
    long p = RAW6(SYS_mmap, cursor, bytes, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == (long)cursor) {
        cursor += bytes;
    } else {
        if (!(p < 0 && p > -4096))
            RAW2(SYS_munmap, p, bytes);   /* a kernel without NOREPLACE took it as a hint */
        p = RAW6(SYS_mmap, 0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (p < 0 && p > -4096)
        return -ENOMEM;
    if (*table) {
        memcpy((void *)p, *table, *cap * elem);
        RAW2(SYS_munmap, *table, *cap * elem);
    }
    *table = (void *)p;
    *cap = ncap;
    return 0;
}

/* The index of the first extent whose end is past addr. */
static size_t find(uintptr_t addr)
{
    size_t lo = 0, hi = next_;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ext[mid].end <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int insert(uintptr_t start, uintptr_t end, uint64_t off)
{
    if (next_ == ext_cap && grow((void **)&ext, &ext_cap, sizeof *ext))
        return -ENOMEM;
    size_t i = find(start);
    memmove(ext + i + 1, ext + i, (next_ - i) * sizeof *ext);
    ext[i] = (struct extent){start, end, off};
    next_++;
    return 0;
}

static void punch(uint64_t off, uint64_t len)
{
    char req[96], num[24];
    req[0] = 0;
    cdm_strlcat(req, cdm_utoa(num, off), sizeof req);
    cdm_strlcat(req, " ", sizeof req);
    cdm_strlcat(req, cdm_utoa(num, len), sizeof req);
    cdm_strlcat(req, " remove\n", sizeof req);
    cdm_write_fd(cdm.fd_advise, req);
}

/* Offsets given up: their pages go now (they must read zero when reused). */
static void release_offsets(uint64_t off, uint64_t len)
{
    punch(off, len);
    if (off + len == bump) {
        bump = off;
        return;
    }
    for (size_t i = 0; i < nfree; i++) {         /* merge with a neighbour */
        if (freel[i].off + freel[i].len == off) {
            freel[i].len += len;
            return;
        }
        if (off + len == freel[i].off) {
            freel[i].off = off;
            freel[i].len += len;
            return;
        }
    }
    if (nfree == free_cap && grow((void **)&freel, &free_cap, sizeof *freel))
        return;                                  /* leaked: offset space is sparse */
    freel[nfree++] = (struct range){off, len};
}

static long alloc_offsets(uint64_t len)
{
    for (size_t i = 0; i < nfree; i++) {
        if (freel[i].len >= len) {
            uint64_t off = freel[i].off;
            freel[i].off += len;
            freel[i].len -= len;
            if (!freel[i].len)
                freel[i] = freel[--nfree];
            return (long)off;
        }
    }
    if (bump + len > fsize) {
        uint64_t size = fsize * 2;
        while (size < bump + len)
            size *= 2;
        long r = RAW2(SYS_ftruncate, cdm.fd_data, size);
        if (r < 0)
            return r;
        fsize = size;
    }
    bump += len;
    return (long)(bump - len);
}

/* len more offsets at the top (never from the free list). */
static long grow_top(uint64_t len)
{
    uint64_t save = nfree;
    nfree = 0;                       /* alloc_offsets then takes from the top */
    long r = alloc_offsets(len);
    nfree = save;
    return r;
}

/* Takes [start, end) out of the table; the offsets it held are released. */
static void forget(uintptr_t start, uintptr_t end)
{
    size_t i = find(start);
    while (i < next_ && ext[i].start < end) {
        struct extent e = ext[i];
        uintptr_t a = e.start > start ? e.start : start;
        uintptr_t b = e.end < end ? e.end : end;
        release_offsets(e.off + (a - e.start), b - a);
        if (e.start < a && e.end > b) {          /* split in two */
            ext[i].end = a;
            insert(b, e.end, e.off + (b - e.start));
            return;
        }
        if (e.start < a) {
            ext[i].end = a;
            i++;
        } else if (e.end > b) {
            ext[i].start = b;
            ext[i].off = e.off + (b - e.start);
            i++;
        } else {
            memmove(ext + i, ext + i + 1, (next_ - i - 1) * sizeof *ext);
            next_--;
        }
    }
}

long cdm_offset_of(uintptr_t addr, uintptr_t *extent_end)
{
    size_t i = find(addr);
    if (i < next_ && ext[i].start <= addr) {
        if (extent_end)
            *extent_end = ext[i].end;
        return (long)(ext[i].off + ((addr & ~(PAGE - 1)) - ext[i].start));
    }
    return -1;
}

int cdm_for_each_piece(uintptr_t start, uintptr_t end,
                       int (*fn)(uintptr_t, size_t, uint64_t, void *), void *arg)
{
    for (size_t i = find(start); i < next_ && ext[i].start < end; i++) {
        uintptr_t a = ext[i].start > start ? ext[i].start : start;
        uintptr_t b = ext[i].end < end ? ext[i].end : end;
        int r = fn(a, b - a, ext[i].off + (a - ext[i].start), arg);
        if (r)
            return r;
    }
    return 0;
}

uint64_t cdm_region_used(void)
{
    return bump;
}

long cdm_piece_at(uintptr_t addr, uintptr_t end, uintptr_t *piece_end)
{
    size_t i = find(addr);
    if (i < next_ && ext[i].start <= addr) {
        *piece_end = ext[i].end < end ? ext[i].end : end;
        return (long)(ext[i].off + (addr - ext[i].start));
    }
    *piece_end = i < next_ && ext[i].start < end ? ext[i].start : end;
    return -1;
}

long cdm_bounce_alloc(uint64_t len)
{
    return alloc_offsets(len);
}

void cdm_bounce_free(uint64_t off, uint64_t len)
{
    release_offsets(off, len);
}

/* ------------------------------------------------------------ setup */

/* The interposer's descriptors live high, out of the way of programs that
 * reuse low numbers (dup2 onto 3, 4...). */
#define HIGH_FD 900

static long open_in(const char *dir, const char *name, int flags)
{
    char path[1400];
    cdm_strlcpy(path, dir, sizeof path);
    cdm_strlcat(path, "/", sizeof path);
    cdm_strlcat(path, name, sizeof path);
    long fd = RAW4(SYS_openat, AT_FDCWD, path, flags | O_CLOEXEC, 0);
    if (fd >= 0 && fd < HIGH_FD) {
        long high = RAW3(SYS_fcntl, fd, F_DUPFD_CLOEXEC, HIGH_FD);
        if (high >= 0) {
            RAW1(SYS_close, fd);
            fd = high;
        }
    }
    return fd;
}

static void close_fds(void)
{
    int *fds[] = {&cdm.fd_data, &cdm.fd_mbind, &cdm.fd_migrate, &cdm.fd_advise, &cdm.fd_policy};
    for (size_t i = 0; i < sizeof fds / sizeof *fds; i++) {
        if (*fds[i] >= 0)
            RAW1(SYS_close, *fds[i]);
        *fds[i] = -1;
    }
}

/* Opens the control files of the region at cdm.dir (data is opened by the caller). */
static int open_controls(void)
{
    long a = open_in(cdm.dir, "mbind", O_RDWR), b = open_in(cdm.dir, "migrate", O_RDWR);
    long c = open_in(cdm.dir, "advise", O_WRONLY), d = open_in(cdm.dir, "policy", O_RDWR);
    cdm.fd_mbind = (int)a, cdm.fd_migrate = (int)b, cdm.fd_advise = (int)c, cdm.fd_policy = (int)d;
    return a < 0 || b < 0 || c < 0 || d < 0 ? -EIO : 0;
}

static void write_owner(int pid)
{
    char num[24];
    long fd = open_in(cdm.dir, "owner_pid", O_WRONLY);
    if (fd >= 0) {
        cdm_utoa(num, (unsigned long)pid);
        cdm_strlcat(num, "\n", sizeof num);
        cdm_write_fd((int)fd, num);
        RAW1(SYS_close, fd);
    }
}

static void set_paths(int pid)
{
    char num[24];
    cdm.pid = pid;
    cdm_strlcpy(cdm.dir, cdm.mount, sizeof cdm.dir);
    cdm_strlcat(cdm.dir, "/regions/", sizeof cdm.dir);
    cdm_strlcat(cdm.dir, cdm_utoa(num, (unsigned long)pid), sizeof cdm.dir);
    cdm_strlcpy(cdm.data_path, cdm.dir, sizeof cdm.data_path);
    cdm_strlcat(cdm.data_path, "/data", sizeof cdm.data_path);
}

static int setup_locked(void)
{
    if (cdm.ready)
        return cdm.ready > 0 ? 0 : -1;
    const char *mnt = getenv("CDMFS_RUN_MOUNT");
    if (!mnt || !*mnt) {
        cdm.ready = -1;
        return -1;
    }
    cdm_strlcpy(cdm.mount, mnt, sizeof cdm.mount);
    const char *min = getenv("CDMFS_RUN_MIN_SIZE");
    cdm.min_size = min ? strtoul(min, NULL, 10) : 0;
    const char *fa = getenv("CDMFS_RUN_FAULT_AROUND");
    cdm.fault_around = fa && *fa == '1';
    set_paths((int)RAW0(SYS_getpid));
    long r = RAW3(SYS_mkdirat, AT_FDCWD, cdm.dir, 0700);
    int reused = r == -EEXIST;      /* after exec: the pid's region is ours */
    if (r < 0 && !reused)
        goto fail;
    long fd = open_in(cdm.dir, "data", O_RDWR);
    if (fd < 0)
        goto fail;
    cdm.fd_data = (int)fd;
    /* pread of one page (get_mempolicy's fault-in) must not read around. */
    RAW4(SYS_fadvise64, fd, 0, 0, POSIX_FADV_RANDOM);
    if (open_controls())
        goto fail;
    write_owner(cdm.pid);
    if (reused) {
        /* The old image's memory and mbind ranges go, as exec drops the mm. */
        RAW2(SYS_ftruncate, cdm.fd_data, 0);
    }
    if (RAW2(SYS_ftruncate, cdm.fd_data, INITIAL_SIZE) < 0)
        goto fail;
    fsize = INITIAL_SIZE;
    bump = 0;
    cdm.ready = 1;
    cdm_mempolicy_init();
    return 0;
fail:
    close_fds();
    cdm.ready = -1;
    return -1;
}

int cdm_setup(void)
{
    if (cdm.ready)
        return cdm.ready > 0 ? 0 : -1;
    cdm_lock();
    int r = setup_locked();
    cdm_unlock();
    return r;
}

/* ------------------------------------------------------------ the mmap family */

/* The kernel faults anonymous memory a page at a time; a fault on a file
 * mapping reads around (32 pages here), which would place pages the
 * program never touched, by the policy of the moment, and on offsets that
 * a later mapping or mbind() takes.  MADV_RANDOM makes a fault one page,
 * unless `cdmfs run --fault-around` traded that exactness for speed. */
static void one_page_a_fault(uintptr_t addr, size_t len)
{
    if (!cdm.fault_around)
        RAW3(SYS_madvise, addr, len, MADV_RANDOM);
}

static int wanted(size_t len, int prot, int flags, int fd)
{
    (void)fd;
    if (cdm.ready < 0 || cdm_in_lib || !len)
        return 0;
    if (!(flags & MAP_ANONYMOUS) || (flags & MAP_TYPE) != MAP_PRIVATE)
        return 0;
    if (flags & (MAP_HUGETLB | MAP_GROWSDOWN) || prot & PROT_EXEC)
        return 0;
    if (!cdm.ready) {
        if (cdm_setup())
            return 0;
    }
    return len >= cdm.min_size;
}

static void *mmap_impl(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (fd >= 0 && !(flags & MAP_ANONYMOUS) && cdm_dmirror_is(fd))
        return cdm_dmirror_mmap(addr, len, prot, flags);
    if (!wanted(len, prot, flags, fd)) {
        long r = RAW6(SYS_mmap, addr, len, prot, flags, fd, off);
        if (r < 0 && r > -4096)
            return (void *)cdm_ret(r);
        if (flags & MAP_FIXED && next_) {      /* replaced a part of the region */
            cdm_lock();
            forget((uintptr_t)r, (uintptr_t)r + ((len + PAGE - 1) & ~(PAGE - 1)));
            cdm_unlock();
        }
        return (void *)r;
    }
    size_t alen = (len + PAGE - 1) & ~(PAGE - 1);
    cdm_in_lib = 1;
    cdm_lock();
    long o = alloc_offsets(alen);
    long r = o;
    if (o >= 0) {
        int sflags = (flags & ~(MAP_TYPE | MAP_ANONYMOUS | 0x4000000 /* MAP_UNINITIALIZED */)) | MAP_SHARED;
        r = RAW6(SYS_mmap, addr, alen, prot, sflags, cdm.fd_data, o);
        if (r < 0 && r > -4096) {
            release_offsets((uint64_t)o, alen);
        } else {
            if (flags & MAP_FIXED)
                forget((uintptr_t)r, (uintptr_t)r + alen);
            insert((uintptr_t)r, (uintptr_t)r + alen, (uint64_t)o);
            one_page_a_fault((uintptr_t)r, alen);
        }
    }
    cdm_unlock();
    cdm_in_lib = 0;
    if (r < 0 && r > -4096)
        return (void *)cdm_ret(r);
    cdm_policy_for_mmap((uintptr_t)r, alen, (uint64_t)o);
    return (void *)r;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return mmap_impl(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return mmap_impl(addr, len, prot, flags, fd, off);
}

int munmap(void *addr, size_t len)
{
    long r = RAW2(SYS_munmap, addr, len);
    if (r == 0 && next_ && !cdm_in_lib) {
        cdm_lock();
        forget((uintptr_t)addr, (uintptr_t)addr + ((len + PAGE - 1) & ~(PAGE - 1)));
        cdm_dmirror_unmap((uintptr_t)addr, (uintptr_t)addr + ((len + PAGE - 1) & ~(PAGE - 1)));
        cdm_unlock();
    }
    return (int)cdm_ret(r);
}

/* Copies len bytes of the region from offset src to offset dst through the
 * data file (whatever the mappings' protections). */
static int copy_offsets(uint64_t src, uint64_t dst, uint64_t len)
{
    static char buf[1 << 16];
    while (len) {
        size_t n = len < sizeof buf ? len : sizeof buf;
        long r = RAW4(SYS_pread64, cdm.fd_data, buf, n, src);
        if (r <= 0)
            return r < 0 ? (int)r : -EIO;
        long w = RAW4(SYS_pwrite64, cdm.fd_data, buf, r, dst);
        if (w != r)
            return w < 0 ? (int)w : -EIO;
        src += r, dst += r, len -= r;
    }
    return 0;
}

void *mremap(void *old, size_t oldlen, size_t newlen, int flags, ...)
{
    void *target = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        target = va_arg(ap, void *);
        va_end(ap);
    }
    uintptr_t a = (uintptr_t)old;
    oldlen = (oldlen + PAGE - 1) & ~(PAGE - 1);
    newlen = (newlen + PAGE - 1) & ~(PAGE - 1);
    cdm_lock();
    uintptr_t end = 0;
    long off = next_ && !cdm_in_lib ? cdm_offset_of(a, &end) : -1;
    if (off < 0) {
        cdm_unlock();
        long r = RAW6(SYS_mremap, old, oldlen, newlen, flags, target, 0);
        if (!(r < 0 && r > -4096) && flags & MREMAP_FIXED && next_) {
            cdm_lock();
            forget((uintptr_t)r, (uintptr_t)r + newlen);
            cdm_unlock();
        }
        return (void *)cdm_ret(r);
    }
    long r;
    if (end < a + oldlen || a & (PAGE - 1)) {
        r = -EFAULT;                             /* more than one of our mappings */
    } else if (newlen <= oldlen && !(flags & MREMAP_FIXED)) {
        r = RAW6(SYS_mremap, old, oldlen, newlen, flags, 0, 0);
        if (r == (long)a)
            forget(a + newlen, a + oldlen);
    } else if ((uint64_t)off + oldlen == bump && !(flags & MREMAP_FIXED)) {
        /* At the top of the offsets: the mapping grows in the file too. */
        long more = grow_top(newlen - oldlen);
        r = more;
        if (more >= 0) {
            r = RAW6(SYS_mremap, old, oldlen, newlen, flags, 0, 0);
            if (r < 0 && r > -4096) {
                release_offsets((uint64_t)more, newlen - oldlen);
            } else {
                size_t i = find(a);
                memmove(ext + i, ext + i + 1, (next_ - i - 1) * sizeof *ext);
                next_--;
                insert((uintptr_t)r, (uintptr_t)r + newlen, (uint64_t)off);
            }
        }
    } else if (!(flags & MREMAP_MAYMOVE)) {
        r = -ENOMEM;                             /* the offsets after it are taken */
    } else {
        /* Moves: new offsets, the bytes copied through the file. */
        long o = alloc_offsets(newlen);
        r = o;
        if (o >= 0) {
            int fixed = flags & MREMAP_FIXED ? MAP_FIXED : 0;
            r = RAW6(SYS_mmap, target, newlen, PROT_READ | PROT_WRITE, MAP_SHARED | fixed, cdm.fd_data, o);
            if (r < 0 && r > -4096) {
                release_offsets((uint64_t)o, newlen);
            } else {
                copy_offsets((uint64_t)off, (uint64_t)o, oldlen < newlen ? oldlen : newlen);
                if (fixed)
                    forget((uintptr_t)r, (uintptr_t)r + newlen);
                insert((uintptr_t)r, (uintptr_t)r + newlen, (uint64_t)o);
                one_page_a_fault((uintptr_t)r, newlen);
                RAW2(SYS_munmap, old, oldlen);
                forget(a, a + oldlen);
            }
        }
    }
    cdm_unlock();
    return (void *)cdm_ret(r);
}

int madvise(void *addr, size_t len, int advice)
{
    uintptr_t a = (uintptr_t)addr, e = a + ((len + PAGE - 1) & ~(PAGE - 1));
    if (advice == MADV_HUGEPAGE || advice == MADV_NOHUGEPAGE)
        cdm_dmirror_thp_advice(a, e, advice == MADV_HUGEPAGE);
    int frees = advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_REMOVE;
    if (!frees || !next_ || cdm_in_lib || a & (PAGE - 1))
        return (int)cdm_ret(RAW3(SYS_madvise, addr, len, advice));
    cdm_lock();
    uintptr_t at = a;
    long r = 0;
    for (size_t i = find(a); i < next_ && ext[i].start < e; i++) {
        uintptr_t s = ext[i].start > a ? ext[i].start : a;
        uintptr_t t = ext[i].end < e ? ext[i].end : e;
        if (s > at && r == 0)
            r = RAW3(SYS_madvise, at, s - at, advice);   /* host memory between */
        punch(ext[i].off + (s - ext[i].start), t - s);
        at = t;
    }
    if (at < e && r == 0)
        r = RAW3(SYS_madvise, at, e - at, advice);
    cdm_unlock();
    return (int)cdm_ret(r);
}

/* ------------------------------------------------------------ fork */

static int snap_fd = -1;
static char snap_dir[1200];
static unsigned fork_seq;

/* In the parent, before fork: a copy of the region (policy, mbind ranges,
 * the pages present) that the child will make its own. */
static void fork_prepare(void)
{
    cdm_in_lib = 1;
    cdm_lock();
    snap_fd = -1;
    if (cdm.ready <= 0 || cdm.pid != (int)RAW0(SYS_getpid))
        return;
    char num[24];
    cdm_strlcpy(snap_dir, cdm.dir, sizeof snap_dir);
    cdm_strlcat(snap_dir, ".fork", sizeof snap_dir);
    cdm_strlcat(snap_dir, cdm_utoa(num, ++fork_seq), sizeof snap_dir);
    if (RAW3(SYS_mkdirat, AT_FDCWD, snap_dir, 0700) < 0)
        return;
    long fd = open_in(snap_dir, "data", O_RDWR);
    if (fd < 0)
        return;
    char save[1200];
    cdm_strlcpy(save, cdm.dir, sizeof save);
    cdm_strlcpy(cdm.dir, snap_dir, sizeof cdm.dir);
    write_owner(cdm.pid);                        /* an orphan goes with the parent */
    cdm_strlcpy(cdm.dir, save, sizeof cdm.dir);
    RAW2(SYS_ftruncate, fd, fsize);
    static char text[65536];
    /* The policy and the mbind ranges, line by line. */
    int n = (int)RAW4(SYS_pread64, cdm.fd_policy, text, sizeof text - 1, 0);
    if (n > 0) {
        text[n] = 0;
        long pfd = open_in(snap_dir, "policy", O_WRONLY);
        if (pfd >= 0) {
            cdm_write_fd((int)pfd, text);
            RAW1(SYS_close, pfd);
        }
    }
    n = (int)RAW4(SYS_pread64, cdm.fd_mbind, text, sizeof text - 1, 0);
    if (n > 0) {
        text[n] = 0;
        long mfd = open_in(snap_dir, "mbind", O_WRONLY);
        for (char *line = text; mfd >= 0 && *line;) {
            char *nl = line;
            while (*nl && *nl != '\n')
                nl++;
            char c = *nl;
            *nl = 0;
            cdm_write_fd((int)mfd, line);
            line = c ? nl + 1 : nl;
        }
        if (mfd >= 0)
            RAW1(SYS_close, mfd);
    }
    /* The pages present (pagemap entry not zero), copied through the files. */
    long pm = open_in(cdm.dir, "pagemap", O_RDONLY);
    static uint64_t entries[8192];
    static char buf[1 << 20];
    for (uint64_t page = 0; pm >= 0 && page < bump / PAGE; page += 8192) {
        long got = RAW4(SYS_pread64, pm, entries, sizeof entries, page * 8);
        if (got <= 0)
            break;
        for (long i = 0; i < got / 8;) {
            if (!entries[i]) {
                i++;
                continue;
            }
            long j = i + 1;                      /* a run of pages present, a buffer at most */
            while (j < got / 8 && entries[j] && (size_t)(j - i) * PAGE < sizeof buf)
                j++;
            uint64_t off = (page + i) * PAGE, len = (uint64_t)(j - i) * PAGE;
            for (uint64_t done = 0; done < len;) {      /* short reads and writes go on */
                long n = RAW4(SYS_pread64, cdm.fd_data, buf, len - done, off + done);
                if (n <= 0 && n != -EINTR)
                    break;
                for (long w = 0; n > 0 && w < n;) {
                    long k = RAW4(SYS_pwrite64, fd, buf + w, n - w, off + done + w);
                    if (k <= 0 && k != -EINTR) {
                        n = w;
                        break;
                    }
                    w += k > 0 ? k : 0;
                }
                if (n <= 0)
                    break;
                done += (uint64_t)n;
            }
            i = j;
        }
    }
    if (pm >= 0)
        RAW1(SYS_close, pm);
    snap_fd = (int)fd;
}

static void fork_parent(void)
{
    if (snap_fd >= 0)
        RAW1(SYS_close, snap_fd);
    snap_fd = -1;
    cdm_unlock();
    cdm_in_lib = 0;
}

/* The snapshot remap_onto maps onto, and the parent's data file it replaces. */
struct remap {
    int fd;
    const char *old_path;
};

static int remap_one(const struct cdm_mapping *mp, void *arg)
{
    const struct remap *r = arg;
    if (strcmp(mp->path, r->old_path) == 0) {
        RAW6(SYS_mmap, mp->start, mp->end - mp->start, mp->prot, MAP_SHARED | MAP_FIXED, r->fd,
             mp->offset);
        one_page_a_fault(mp->start, mp->end - mp->start);
    }
    return 0;
}

/* Maps every mapping of the parent's data file in this process onto the
 * same offsets of the snapshot, with its protection (from /proc/self/maps). */
static void remap_onto(int fd, const char *old_path)
{
    static char buf[1 << 16];
    struct remap r = {fd, old_path};
    cdm_for_each_mapping(buf, sizeof buf, remap_one, &r);
}

static void fork_child(void)
{
    if (snap_fd >= 0) {
        int pid = (int)RAW0(SYS_getpid);
        char old_path[1300];
        cdm_strlcpy(old_path, cdm.data_path, sizeof old_path);
        set_paths(pid);
        long r = RAW4(SYS_renameat, AT_FDCWD, snap_dir, AT_FDCWD, cdm.dir);
        if (r == -ENOTEMPTY || r == -EEXIST) {
            /* a region left by a process that had this pid before: it is gone */
            RAW3(SYS_unlinkat, AT_FDCWD, cdm.dir, AT_REMOVEDIR);
            r = RAW4(SYS_renameat, AT_FDCWD, snap_dir, AT_FDCWD, cdm.dir);
        }
        if (r == 0) {
            write_owner(pid);
            remap_onto(snap_fd, old_path);
            close_fds();
            cdm.fd_data = snap_fd;
            RAW4(SYS_fadvise64, snap_fd, 0, 0, POSIX_FADV_RANDOM);
            open_controls();
        } else {
            cdm.ready = -1;          /* shares the parent's memory: say so by failing later */
        }
        snap_fd = -1;
    } else if (cdm.ready > 0) {
        cdm.ready = -1;
    }
    cdm_unlock();
    cdm_in_lib = 0;
}

__attribute__((constructor)) static void cdm_init(void)
{
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}
