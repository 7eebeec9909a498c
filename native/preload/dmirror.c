/* /dev/hmm_dmirrorN under `cdmfs run`: the kernel's HMM test device
 * (lib/test_hmm.c), emulated on the mount's devices so that a program
 * written against it (tools/testing/selftests/mm/hmm-tests.c, a driver
 * prototype) runs unmodified.
 *
 * Opening /dev/hmm_dmirrorN opens MOUNT/devices/dmirrorN/access: the
 * descriptor the program gets is that transaction file, and this file keeps
 * what the driver keeps per open file (its flags).  Each ioctl is checked as
 * the driver checks it (the command block readable, addr page aligned, the
 * range not empty nor wrapping, the mappings covering it and their
 * protections), then carried out by the device machinery of the daemon:
 *
 *   READ, WRITE       device access copyout / copyin: the device faults what
 *                     it has not mapped and copies through a bounce range of
 *                     the region (set aside here, pread / pwritten from the
 *                     program's buffer at ptr, freed after)
 *   MIGRATE_TO_DEV    the region's migrate file on the pages in system
 *                     memory (the snapshot says which), then a copyout of
 *                     the pages the device has mapped (ENOENT otherwise)
 *   MIGRATE_TO_SYS    migrate of the pages in this device's memory to a CPU node
 *   SNAPSHOT          the device's snapshot of the CPU page table, with the
 *                     protections of the program's mappings
 *   EXCLUSIVE         copyout ... exclusive (make_device_exclusive)
 *   CHECK_EXCLUSIVE   check_exclusive: EPERM while a page is still exclusive
 *   RELEASE           the device's online file: 0 (its memory evacuated), 1
 *   FLAGS             FAIL_ALLOC: the device's inject fail_alloc, at the next
 *                     migration to it
 *
 * Memory outside the region (shared anonymous and file mappings, the stack)
 * is not on the emulated machine: the device reads and writes it by a plain
 * copy, cannot migrate it (ENOENT, as the driver answers for memory
 * migrate_vma does not take) and snapshots it from /proc/self/pagemap.
 *
 * The whole ioctl holds the region's lock: a munmap or mmap of another
 * thread waits for it, as the kernel's would for mmap_lock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "hmm_dmirror.h"
#include "preload.h"

#define MAX_FD 4096
#define NVMAS 512
#define HUGE (2UL << 20)
#define COPY_CHUNK (16UL << 20)    /* bytes a copy request moves at most (devices.py COPY_AT_ONCE) */

struct dmfile {
    int dev;                 /* N of /dev/hmm_dmirrorN; -1: not ours */
    int fd_snapshot;         /* MOUNT/devices/dmirrorN/snapshot, opened lazily */
    uint64_t flags;          /* HMM_DMIRROR_FLAGS */
    uint64_t st_dev, st_ino; /* the access file: a number closed behind our back is not it */
};

static struct dmfile files[MAX_FD];
static int files_init;

static void init_files(void)
{
    if (files_init)
        return;
    for (int i = 0; i < MAX_FD; i++)
        files[i] = (struct dmfile){-1, -1, 0, 0, 0};
    files_init = 1;
}

/* Whether fd is a /dev/hmm_dmirrorN of ours.  A descriptor closed without
 * this library seeing it (fclose of an fdopen, a raw close) and its number
 * reused is told apart by its inode. */
int cdm_dmirror_is(int fd)
{
    if (!files_init || fd < 0 || fd >= MAX_FD || files[fd].dev < 0)
        return 0;
    struct stat st;
    if (RAW2(SYS_fstat, fd, &st) == 0 && (uint64_t)st.st_dev == files[fd].st_dev &&
        (uint64_t)st.st_ino == files[fd].st_ino)
        return 1;
    cdm_lock();
    if (files[fd].fd_snapshot >= 0)
        RAW1(SYS_close, files[fd].fd_snapshot);
    files[fd] = (struct dmfile){-1, -1, 0, 0, 0};
    cdm_unlock();
    return 0;
}

/* ------------------------------------------------------------ paths and files */

static void dev_path(int dev, const char *file, char *buf, size_t size)
{
    char num[24];
    cdm_strlcpy(buf, cdm.mount, size);
    cdm_strlcat(buf, "/devices/dmirror", size);
    cdm_strlcat(buf, cdm_utoa(num, (unsigned long)dev), size);
    if (file) {
        cdm_strlcat(buf, "/", size);
        cdm_strlcat(buf, file, size);
    }
}

/* Writes text to a device's control file (a store). */
static int dev_store(int dev, const char *file, const char *text)
{
    char path[1400];
    dev_path(dev, file, path, sizeof path);
    long fd = RAW4(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CLOEXEC, 0);
    if (fd < 0)
        return (int)fd;
    int r = cdm_write_fd((int)fd, text);
    RAW1(SYS_close, fd);
    return r;
}

/* A request on a transaction file; its answer (the first size - 1 bytes) in out. */
static int transact(int fd, const char *req, char *out, size_t size)
{
    int r = cdm_write_fd(fd, req);
    if (r < 0)
        return r;
    size_t got = 0;
    while (got + 1 < size) {
        long n = RAW4(SYS_pread64, fd, out + got, size - 1 - got, got);
        if (n == -EINTR)
            continue;
        if (n < 0)
            return (int)n;
        if (n == 0)
            break;
        got += (size_t)n;
    }
    out[got] = 0;
    return 0;
}

static unsigned long field(const char *text, const char *key)
{
    const char *p = strstr(text, key);
    return p ? strtoul(p + strlen(key), NULL, 10) : 0;
}

/* The migration target of the device's memory: private:dmirrorN, or its node. */
static void dev_target(int dev, char *buf, size_t size)
{
    char path[1400], text[64], num[24];
    dev_path(dev, "node", path, sizeof path);
    if (cdm_read_file(path, text, sizeof text) > 0 && text[0] >= '0' && text[0] <= '9') {
        cdm_strlcpy(buf, "node:", size);
        cdm_strlcat(buf, cdm_utoa(num, strtoul(text, NULL, 10)), size);
        return;
    }
    cdm_strlcpy(buf, "private:dmirror", size);
    cdm_strlcat(buf, cdm_utoa(num, (unsigned long)dev), size);
}

/* The first node with CPUs: where MIGRATE_TO_SYS sends pages. */
static void cpu_node(char *buf, size_t size)
{
    char path[1400], text[256], num[24];
    cdm_strlcpy(path, cdm.mount, sizeof path);
    cdm_strlcat(path, "/sys/devices/system/node/has_cpu", sizeof path);
    unsigned long n = 0;
    if (cdm_read_file(path, text, sizeof text) > 0)
        n = strtoul(text, NULL, 10);
    cdm_strlcpy(buf, "node:", size);
    cdm_strlcat(buf, cdm_utoa(num, n), size);
}

/* ------------------------------------------------------------ open, close */

int cdm_dmirror_open(const char *path, int flags)
{
    const char *p = path + 16;          /* after "/dev/hmm_dmirror" */
    if (!getenv("CDMFS_RUN_MOUNT"))
        return -ENOSYS;                  /* not under cdmfs run: the host's file */
    if (*p < '0' || *p > '9')
        return -ENOENT;
    unsigned long dev = 0;
    for (; *p >= '0' && *p <= '9'; p++)
        dev = dev * 10 + (unsigned long)(*p - '0');
    if (*p || dev > 1000)
        return -ENOENT;
    if (cdm_setup())
        return -ENODEV;                  /* no region: no process memory to mirror */
    char dpath[1400];
    dev_path((int)dev, "access", dpath, sizeof dpath);
    long fd = RAW4(SYS_openat, AT_FDCWD, dpath, O_RDWR | (flags & O_CLOEXEC), 0);
    if (fd == -ENOENT)
        return -ENOENT;                  /* no such device, as with no device node */
    if (fd < 0)
        return (int)fd;
    if (fd >= MAX_FD) {
        RAW1(SYS_close, fd);
        return -EMFILE;
    }
    /* test_hmm's device faults pages in where they are (hmm_range_fault):
     * only its migrations move them. */
    dev_store((int)dev, "fault_policy", "remote\n");
    struct stat st;
    if (RAW2(SYS_fstat, fd, &st)) {
        RAW1(SYS_close, fd);
        return -EIO;
    }
    cdm_lock();
    init_files();
    files[fd] = (struct dmfile){(int)dev, -1, 0, (uint64_t)st.st_dev, (uint64_t)st.st_ino};
    cdm_unlock();
    return (int)fd;
}

void cdm_dmirror_close(int fd)
{
    if (!cdm_dmirror_is(fd))
        return;
    cdm_lock();
    if (files[fd].fd_snapshot >= 0)
        RAW1(SYS_close, files[fd].fd_snapshot);
    files[fd] = (struct dmfile){-1, -1, 0, 0, 0};
    cdm_unlock();
}

int close(int fd)
{
    cdm_dmirror_close(fd);
    return (int)cdm_ret(RAW1(SYS_close, fd));
}

int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (cdm_dmirror_is(fd))
        return (int)cdm_ret(cdm_dmirror_ioctl(fd, req, arg));
    return (int)cdm_ret(RAW3(SYS_ioctl, fd, req, arg));
}

/* ------------------------------------------------------------ mmap of the device file */

/* test_hmm's mmap fills the mapping with zeroed pages of the driver's
 * (vm_insert_page): present at once, read-only in a private mapping until
 * written (copy on write).  Here: anonymous memory of the host, and the
 * ranges kept so that a snapshot reports those pages as the driver's. */
static struct { uintptr_t start, end; int shared; } devmaps[64];
static int ndevmaps;

void *cdm_dmirror_mmap(void *addr, size_t len, int prot, int flags)
{
    int type = (flags & MAP_TYPE) == MAP_SHARED ? MAP_SHARED : MAP_PRIVATE;
    long r = RAW6(SYS_mmap, addr, len, prot, (flags & ~MAP_TYPE) | type | MAP_ANONYMOUS, -1, 0);
    if (r < 0 && r > -4096)
        return (void *)cdm_ret(r);
    cdm_lock();
    if (ndevmaps < (int)(sizeof devmaps / sizeof *devmaps))
        devmaps[ndevmaps++] = (typeof(devmaps[0])){(uintptr_t)r, (uintptr_t)r + ((len + PAGE - 1) & ~(PAGE - 1)),
                                                    type == MAP_SHARED};
    cdm_unlock();
    return (void *)r;
}

void cdm_dmirror_unmap(uintptr_t start, uintptr_t end)
{
    for (int i = 0; i < ndevmaps;) {
        if (devmaps[i].start < end && start < devmaps[i].end)
            devmaps[i] = devmaps[--ndevmaps];     /* gone (whole, or cut: no longer the driver's) */
        else
            i++;
    }
}

static int devmap_of(uintptr_t a)
{
    for (int i = 0; i < ndevmaps; i++)
        if (devmaps[i].start <= a && a < devmaps[i].end)
            return i;
    return -1;
}

/* ------------------------------------------------------------ the mappings */

struct vma {
    uintptr_t start, end;
    int prot;                /* PROT_*, or -1: no mapping (a hole) */
};

/* The walk of vmas_of: the mappings met so far, clipped to [at, end). */
struct vma_walk {
    uintptr_t at, end;
    struct vma *out;
    int n, max;
};

static int add_vma(const struct cdm_mapping *mp, void *arg)
{
    struct vma_walk *w = arg;
    if (mp->end <= w->at)
        return 0;
    if (mp->start >= w->end)
        return 1;                           /* past the range: done */
    if (w->n + 2 > w->max)
        return -ENOMEM;
    if (mp->start > w->at) {
        w->out[w->n++] = (struct vma){w->at, mp->start, -1};
        w->at = mp->start;
    }
    uintptr_t e = mp->end < w->end ? mp->end : w->end;
    w->out[w->n++] = (struct vma){w->at, e, mp->prot & (PROT_READ | PROT_WRITE)};
    w->at = e;
    return w->at >= w->end;
}

/* The mappings covering [start, end), clipped to it, in order, holes as
 * prot -1 (from /proc/self/maps).  Returns how many, or -errno. */
static int vmas_of(uintptr_t start, uintptr_t end, struct vma *out, int max)
{
    static char buf[1 << 16];
    struct vma_walk w = {start, end, out, 0, max};
    int rc = cdm_for_each_mapping(buf, sizeof buf, add_vma, &w);
    if (rc < 0)
        return rc;
    if (w.at < end && w.n < max)
        out[w.n++] = (struct vma){w.at, end, -1};
    return w.n;
}

/* The calling process's memory, read or written without faulting this
 * library on a bad pointer: EFAULT instead. */
static int self_copy(void *dst, const void *src, size_t len)
{
    struct iovec local = {dst, len}, remote = {(void *)src, len};
    long r = RAW6(SYS_process_vm_readv, RAW0(SYS_getpid), &local, 1, &remote, 1, 0);
    if (r < 0)
        return r == -ENOMEM ? -EFAULT : (int)r;
    return (size_t)r == len ? 0 : -EFAULT;
}

/* ------------------------------------------------------------ the commands */

struct op {
    int fd, dev;
    struct hmm_dmirror_cmd cmd;
    uintptr_t start, end;
};

static void request(char *buf, size_t size, const char *op, uint64_t off, uint64_t len,
                    long bounce, const char *mode)
{
    char num[24];
    cdm_strlcpy(buf, op, size);
    cdm_strlcat(buf, " ", size);
    cdm_strlcat(buf, cdm_utoa(num, (unsigned long)cdm.pid), size);
    cdm_strlcat(buf, " ", size);
    cdm_strlcat(buf, cdm_utoa(num, off), size);
    cdm_strlcat(buf, " ", size);
    cdm_strlcat(buf, cdm_utoa(num, len), size);
    if (bounce >= 0) {
        cdm_strlcat(buf, " ", size);
        cdm_strlcat(buf, cdm_utoa(num, (unsigned long)bounce), size);
    }
    if (mode && *mode) {
        cdm_strlcat(buf, " ", size);
        cdm_strlcat(buf, mode, size);
    }
    cdm_strlcat(buf, "\n", size);
}

/* copyout (into the program's buffer at dst) or copyin (from src) of a piece
 * of the region at offset off, through a bounce range, COPY_CHUNK at a time
 * (the daemon takes no more at once). */
static int region_copy_chunk(struct op *o, const char *op, uint64_t off, uint64_t len, void *buf,
                             const char *mode);

static int region_copy(struct op *o, const char *op, uint64_t off, uint64_t len, void *buf,
                       const char *mode)
{
    for (uint64_t done = 0; done < len; done += COPY_CHUNK) {
        uint64_t k = len - done < COPY_CHUNK ? len - done : COPY_CHUNK;
        int r = region_copy_chunk(o, op, off + done, k, (char *)buf + done, mode);
        if (r)
            return r;
    }
    return 0;
}

static int region_copy_chunk(struct op *o, const char *op, uint64_t off, uint64_t len, void *buf,
                             const char *mode)
{
    char req[256], ans[512];
    long bounce = cdm_bounce_alloc(len);
    if (bounce < 0)
        return (int)bounce;
    int r = 0;
    if (!strcmp(op, "copyin")) {
        long w = RAW4(SYS_pwrite64, cdm.fd_data, buf, len, bounce);
        r = w < 0 ? (int)w : (uint64_t)w != len ? -EFAULT : 0;
    }
    if (!r) {
        request(req, sizeof req, op, off, len, bounce, mode);
        r = transact(o->fd, req, ans, sizeof ans);
    }
    if (!r && !strcmp(op, "copyout")) {
        long got = RAW4(SYS_pread64, cdm.fd_data, buf, len, bounce);
        r = got < 0 ? (int)got : (uint64_t)got != len ? -EIO : 0;
    }
    cdm_bounce_free((uint64_t)bounce, len);
    if (!r) {
        o->cmd.cpages += len / PAGE;
        if (field(ans, "faults="))
            o->cmd.faults = 1;      /* one round of hmm_range_fault covered the rest */
    }
    return r;
}

/* READ, WRITE, the read-backs: piece by piece, in the region or not. */
static int copy_range(struct op *o, const char *op, const char *mode, int host_errno)
{
    for (uintptr_t a = o->start; a < o->end;) {
        uintptr_t pe;
        long off = cdm_piece_at(a, o->end, &pe);
        char *buf = (char *)(uintptr_t)o->cmd.ptr + (a - o->start);
        int r;
        if (off >= 0) {
            r = region_copy(o, op, (uint64_t)off, pe - a, buf, mode);
        } else if (host_errno) {
            r = -host_errno;
        } else {
            r = !strcmp(op, "copyout") ? self_copy(buf, (void *)a, pe - a) : self_copy((void *)a, buf, pe - a);
            if (!r) {
                o->cmd.cpages += (pe - a) / PAGE;
                o->cmd.faults = 1;
            }
        }
        if (r)
            return r;
        a = pe;
    }
    return 0;
}

/* The snapshot of a piece of the region, a code a page into codes[]: the
 * daemon's flags of the CPU page table with the mapping's protection. */
static int snapshot_piece(struct op *o, uint64_t off, uint64_t len, uint8_t *codes, int writable)
{
    static char buf[1 << 16];
    char req[256];
    struct dmfile *f = &files[o->fd];
    if (f->fd_snapshot < 0) {
        char path[1400];
        dev_path(o->dev, "snapshot", path, sizeof path);
        long fd = RAW4(SYS_openat, AT_FDCWD, path, O_RDWR | O_CLOEXEC, 0);
        if (fd < 0)
            return (int)fd;
        f->fd_snapshot = (int)fd;
    }
    request(req, sizeof req, "", off, len, -1, "cpu");
    int r = cdm_write_fd(f->fd_snapshot, req + 1);      /* "PID OFF LEN cpu" */
    if (r < 0)
        return r;
    uint64_t first = off / PAGE, n = len / PAGE, pos = 0;
    size_t have = 0;
    for (;;) {
        long got = RAW4(SYS_pread64, f->fd_snapshot, buf + have, sizeof buf - 1 - have, pos);
        if (got == -EINTR)
            continue;
        if (got < 0)
            return (int)got;
        pos += (uint64_t)got;
        have += (size_t)got;
        buf[have] = 0;
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n'))) {
            *nl = 0;
            char *flag;
            uint64_t page = strtoul(line, &flag, 10);
            flag++;
            uint8_t c = HMM_DMIRROR_PROT_ERROR;
            uint8_t rw = writable ? HMM_DMIRROR_PROT_WRITE : HMM_DMIRROR_PROT_READ;
            if (!strcmp(flag, "none"))
                c = HMM_DMIRROR_PROT_NONE;
            else if (!strcmp(flag, "private-remote"))
                c = HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE | rw;   /* do_snapshot reports it as none */
            else if (!strcmp(flag, "zero"))
                c = HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ;
            else if (!strcmp(flag, "write") || !strcmp(flag, "read"))
                c = rw;
            else if (!strcmp(flag, "private-local"))
                c = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | rw;
            else if (!strcmp(flag, "coherent-local"))
                c = HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | rw;
            else if (!strcmp(flag, "coherent-remote"))
                c = HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | rw;
            if (page >= first && page < first + n)
                codes[page - first] = c;
            line = nl + 1;
        }
        have = strlen(line);
        memmove(buf, line, have);
        if (got == 0)
            break;
    }
    return 0;
}

/* Runs of the pages of [off, off + len) whose snapshot code satisfies
 * want(): fn(run offset, run length) for each. */
static int for_runs(struct op *o, uint64_t off, uint64_t len, int (*want)(uint8_t),
                    int (*fn)(struct op *, uint64_t, uint64_t, void *), void *arg)
{
    static uint8_t codes[1 << 16];
    for (uint64_t done = 0; done < len;) {
        uint64_t k = len - done < sizeof codes * PAGE ? len - done : sizeof codes * PAGE;
        int r = snapshot_piece(o, off + done, k, codes, 1);
        if (r)
            return r;
        for (uint64_t i = 0; i < k / PAGE;) {
            if (!want(codes[i])) {
                i++;
                continue;
            }
            uint64_t j = i + 1;
            while (j < k / PAGE && want(codes[j]))
                j++;
            r = fn(o, off + done + i * PAGE, (j - i) * PAGE, arg);
            if (r)
                return r;
            i = j;
        }
        done += k;
    }
    return 0;
}

static int in_system(uint8_t c)
{
    return c != HMM_DMIRROR_PROT_ERROR && (c & 0xF0) != HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL &&
           (c & 0xF0) != HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE &&
           (c & 0xF0) != HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL &&
           (c & 0xF0) != HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE;
}

static int in_device(uint8_t c)
{
    return (c & 0xF0) == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL ||
           (c & 0xF0) == HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL;
}

static int migrate_run(struct op *o, uint64_t off, uint64_t len, void *target)
{
    char req[256], ans[4096], num[24];
    req[0] = 0;
    cdm_strlcat(req, cdm_utoa(num, off), sizeof req);
    cdm_strlcat(req, " ", sizeof req);
    cdm_strlcat(req, cdm_utoa(num, len), sizeof req);
    cdm_strlcat(req, " ", sizeof req);
    cdm_strlcat(req, (const char *)target, sizeof req);
    cdm_strlcat(req, "\n", sizeof req);
    int r = transact(cdm.fd_migrate, req, ans, sizeof ans);
    if (r)
        return r;
    o->cmd.cpages += field(ans, "migrated ");
    return 0;
}

/* MADV_HUGEPAGE ranges: where the driver would try a huge page first. */
static struct { uintptr_t start, end; } thp[64];
static int nthp;

void cdm_dmirror_thp_advice(uintptr_t start, uintptr_t end, int on)
{
    cdm_lock();
    for (int i = 0; i < nthp;) {            /* the range's old advice goes */
        if (thp[i].start < end && start < thp[i].end)
            thp[i] = thp[--nthp];
        else
            i++;
    }
    if (on && nthp < (int)(sizeof thp / sizeof *thp))
        thp[nthp++] = (typeof(thp[0])){start, end};
    cdm_unlock();
}

static int thp_chunk(uintptr_t a)
{
    uintptr_t s = a & ~(HUGE - 1);
    for (int i = 0; i < nthp; i++)
        if (thp[i].start <= s && s + HUGE <= thp[i].end)
            return 1;
    return 0;
}

/* A check of every mapping of the range before anything runs: an error
 * changes nothing.  need: the protection the command needs; bad_hole,
 * bad_prot: the errnos for a hole and for a mapping without it. */
static int check_vmas(struct op *o, struct vma *v, int *nv, int need_read, int need_write,
                      int bad_hole, int bad_read, int bad_write)
{
    *nv = vmas_of(o->start, o->end, v, NVMAS);
    if (*nv < 0)
        return *nv;
    for (int i = 0; i < *nv; i++) {
        if (v[i].prot < 0 && bad_hole)
            return -bad_hole;
        if (v[i].prot < 0)
            continue;
        if (need_read && !(v[i].prot & PROT_READ))
            return -bad_read;
        if (need_write && !(v[i].prot & PROT_WRITE))
            return -bad_write;
    }
    return 0;
}

static int do_migrate_to_dev(struct op *o, struct vma *v, int nv)
{
    char target[64];
    dev_target(o->dev, target, sizeof target);
    struct dmfile *f = &files[o->fd];
    int injected = 0;
    (void)v, (void)nv;
    if (f->flags & HMM_DMIRROR_FLAG_FAIL_ALLOC) {
        /* The driver fails its next allocation: a huge page's falls back to
         * small ones (no difference here), a small page's is skipped. */
        f->flags &= ~HMM_DMIRROR_FLAG_FAIL_ALLOC;
        if (!thp_chunk(o->start) && dev_store(o->dev, "inject", "fail_alloc 1\n") == 0)
            injected = 1;
    }
    int r = 0;
    for (uintptr_t a = o->start; a < o->end && !r;) {
        uintptr_t pe;
        long off = cdm_piece_at(a, o->end, &pe);
        if (off >= 0)
            r = for_runs(o, (uint64_t)off, pe - a, in_system, migrate_run, target);
        a = pe;
    }
    if (injected)
        dev_store(o->dev, "inject", "fail_alloc 0\n");
    if (r)
        return r;
    o->cmd.cpages = 0;
    /* The migrated data read back: only pages in the device's page table
     * (ENOENT otherwise, as the driver's read-back); memory outside the
     * region is not migrated. */
    return copy_range(o, "copyout", "mapped", ENOENT);
}

static int do_migrate_to_sys(struct op *o)
{
    char target[64];
    cpu_node(target, sizeof target);
    for (uintptr_t a = o->start; a < o->end;) {
        uintptr_t pe;
        long off = cdm_piece_at(a, o->end, &pe);
        if (off >= 0) {
            int r = for_runs(o, (uint64_t)off, pe - a, in_device, migrate_run, target);
            if (r)
                return r;
        }
        a = pe;
    }
    return 0;
}

static int do_snapshot(struct op *o, struct vma *v, int nv)
{
    static uint8_t codes[1 << 16];
    uint8_t *out = (uint8_t *)(uintptr_t)o->cmd.ptr;
    for (int i = 0; i < nv; i++) {
        for (uintptr_t a = v[i].start; a < v[i].end;) {
            uintptr_t pe, e;
            long off = cdm_piece_at(a, v[i].end, &pe);
            e = pe - a > sizeof codes * PAGE ? a + sizeof codes * PAGE : pe;
            uint64_t n = (e - a) / PAGE;
            int r = 0;
            if (v[i].prot < 0 || !(v[i].prot & PROT_READ)) {
                memset(codes, HMM_DMIRROR_PROT_ERROR, n);
            } else if (off >= 0) {
                r = snapshot_piece(o, (uint64_t)off, e - a, codes, v[i].prot & PROT_WRITE);
            } else {
                /* Host memory: present or not, by /proc/self/pagemap. */
                long pm = RAW4(SYS_openat, AT_FDCWD, "/proc/self/pagemap", O_RDONLY | O_CLOEXEC, 0);
                for (uint64_t k = 0; k < n; k++) {
                    uint64_t ent = 0;
                    if (pm >= 0)
                        RAW4(SYS_pread64, pm, &ent, 8, ((a / PAGE) + k) * 8);
                    int rw = v[i].prot & PROT_WRITE ? HMM_DMIRROR_PROT_WRITE : HMM_DMIRROR_PROT_READ;
                    int dm = devmap_of(a + k * PAGE);
                    if (dm >= 0)        /* the driver's page: present; private ones read-only until written */
                        codes[k] = devmaps[dm].shared || (ent >> 56 & 1) ? rw : HMM_DMIRROR_PROT_READ;
                    else
                        codes[k] = !(ent >> 63) ? HMM_DMIRROR_PROT_NONE : rw;
                }
                if (pm >= 0)
                    RAW1(SYS_close, pm);
            }
            /* Another device's private page is not this device's to see:
             * hmm_range_fault leaves it invalid (the owners differ). */
            for (uint64_t k = 0; k < n; k++)
                if ((codes[k] & 0xF0) == HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE)
                    codes[k] = HMM_DMIRROR_PROT_NONE;
            if (!r)
                r = self_copy(out + (a - o->start) / PAGE, codes, n);
            if (r)
                return r;
            o->cmd.cpages += n;
            a = e;
        }
    }
    return 0;
}

static int do_check_exclusive(struct op *o)
{
    char req[256], ans[256];
    for (uintptr_t a = o->start; a < o->end;) {
        uintptr_t pe;
        long off = cdm_piece_at(a, o->end, &pe);
        if (off >= 0) {
            request(req, sizeof req, "check_exclusive", (uint64_t)off, pe - a, -1, NULL);
            int r = transact(o->fd, req, ans, sizeof ans);
            if (r)
                return r;
            if (field(ans, "exclusive="))
                return -EPERM;
        }
        a = pe;
    }
    return 0;
}

long cdm_dmirror_ioctl(int fd, unsigned long req, void *arg)
{
    struct op o = {.fd = fd, .dev = files[fd].dev};
    if (self_copy(&o.cmd, arg, sizeof o.cmd))
        return -EFAULT;
    if (o.cmd.addr & (PAGE - 1))
        return -EINVAL;
    if (o.cmd.addr >= o.cmd.addr + (o.cmd.npages << 12))
        return -EINVAL;
    o.start = o.cmd.addr;
    o.end = o.cmd.addr + (o.cmd.npages << 12);
    o.cmd.cpages = o.cmd.faults = 0;
    static struct vma v[NVMAS];
    int nv = 0, r;
    cdm_in_lib = 1;
    cdm_lock();
    switch (req) {
    case HMM_DMIRROR_READ:
        /* hmm_range_fault: no mapping, or no read permission: EFAULT */
        r = check_vmas(&o, v, &nv, 1, 0, EFAULT, EFAULT, 0);
        if (!r)
            r = copy_range(&o, "copyout", "", 0);
        break;
    case HMM_DMIRROR_WRITE:
        /* ... and a write fault of a mapping without write permission: EPERM */
        r = check_vmas(&o, v, &nv, 1, 1, EFAULT, EFAULT, EPERM);
        if (!r)
            r = copy_range(&o, "copyin", "", 0);
        break;
    case HMM_DMIRROR_MIGRATE_TO_DEV:
        /* migrate_vma needs a readable mapping over every page: EINVAL */
        r = check_vmas(&o, v, &nv, 1, 0, EINVAL, EINVAL, 0);
        if (!r)
            r = do_migrate_to_dev(&o, v, nv);
        break;
    case HMM_DMIRROR_MIGRATE_TO_SYS:
        r = check_vmas(&o, v, &nv, 1, 0, EINVAL, EINVAL, 0);
        if (!r)
            r = do_migrate_to_sys(&o);
        break;
    case HMM_DMIRROR_SNAPSHOT:
        r = check_vmas(&o, v, &nv, 0, 0, 0, 0, 0);
        if (!r)
            r = do_snapshot(&o, v, nv);
        break;
    case HMM_DMIRROR_EXCLUSIVE:
        /* make_device_exclusive faults each page for write (GUP: EFAULT);
         * memory that is not anonymous cannot be made exclusive */
        r = check_vmas(&o, v, &nv, 1, 1, EFAULT, EFAULT, EFAULT);
        if (!r)
            r = copy_range(&o, "copyout", "exclusive", EOPNOTSUPP);
        break;
    case HMM_DMIRROR_CHECK_EXCLUSIVE:
        r = do_check_exclusive(&o);
        break;
    case HMM_DMIRROR_RELEASE:
        /* The device's memory evacuated to system RAM (migrate_device_range), then back in service. */
        r = dev_store(o.dev, "online", "0\n");
        if (!r)
            r = dev_store(o.dev, "online", "1\n");
        break;
    case HMM_DMIRROR_FLAGS:
        files[fd].flags = o.cmd.npages;
        r = 0;
        break;
    default:
        r = -EINVAL;
        break;
    }
    cdm_unlock();
    cdm_in_lib = 0;
    if (r)
        return r;
    if (self_copy(arg, &o.cmd, sizeof o.cmd))
        return -EFAULT;
    return 0;
}
