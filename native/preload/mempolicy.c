/* The NUMA system calls on the emulated machine: set_mempolicy,
 * get_mempolicy, mbind, move_pages, migrate_pages, set_mempolicy_home_node,
 * as libc-style wrappers (libnuma calls them through the PLT) and through
 * syscall(2).  Arguments are checked as mm/mempolicy.c and mm/migrate.c
 * check them, with their errnos; the effects go to the region's control
 * files: policy (the task policy), mbind (VMA policies), migrate (moves), and
 * pagemap answers where a page is.
 *
 * Memory that is not in the region (mappings below --min-size, stacks,
 * files) is host memory: calls on it are checked by the host kernel (holes
 * give its EFAULT) and it counts as node 0.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <pthread.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "preload.h"

#define MPOL_DEFAULT 0
#define MPOL_PREFERRED 1
#define MPOL_BIND 2
#define MPOL_INTERLEAVE 3
#define MPOL_LOCAL 4
#define MPOL_PREFERRED_MANY 5
#define MPOL_WEIGHTED_INTERLEAVE 6
#define MPOL_MAX 7
#define MPOL_F_STATIC_NODES (1 << 15)
#define MPOL_F_RELATIVE_NODES (1 << 14)
#define MPOL_F_NUMA_BALANCING (1 << 13)
#define MPOL_MODE_FLAGS (MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | MPOL_F_NUMA_BALANCING)
#define MPOL_F_NODE 1
#define MPOL_F_ADDR 2
#define MPOL_F_MEMS_ALLOWED 4
#define MPOL_MF_STRICT 1
#define MPOL_MF_MOVE 2
#define MPOL_MF_MOVE_ALL 4

#ifndef SYS_set_mempolicy_home_node
#define SYS_set_mempolicy_home_node 450
#endif

/* The process's policy (its main thread's, inherited by new threads and
 * across exec) and a thread's own once it sets one. */
static struct mpol proc_pol = {.mode = MPOL_DEFAULT, .home = -1};
static __thread struct mpol thread_pol __attribute__((tls_model("initial-exec")));
static __thread int thread_pol_set __attribute__((tls_model("initial-exec")));

static const struct mpol *task_policy(void)
{
    return thread_pol_set ? &thread_pol : &proc_pol;
}

static int is_main_thread(void)
{
    return RAW0(SYS_gettid) == RAW0(SYS_getpid);
}

/* ------------------------------------------------------------ the machine */

/* The node lists change only with hotplug and device offlining: read at
 * most every 20 ms, not at every call. */
static int sys_nodes_read(const char *name, struct nodemask *m);

static int sys_nodes(const char *name, struct nodemask *m)
{
    static struct { const char *name; struct nodemask m; long stamp; } cache[4];
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long now = ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    int slot = -1;
    for (int i = 0; i < 4; i++)
        if (cache[i].name == name || (!cache[i].name && slot < 0))
            slot = i;
    if (slot >= 0 && cache[slot].name == name && now - cache[slot].stamp < 20) {
        *m = cache[slot].m;
        return 0;
    }
    int r = sys_nodes_read(name, m);
    if (!r && slot >= 0) {
        cache[slot].m = *m;
        cache[slot].stamp = now;
        cache[slot].name = name;
    }
    return r;
}

static int sys_nodes_read(const char *name, struct nodemask *m)
{
    char path[1400], text[4096];
    cdm_strlcpy(path, cdm.mount, sizeof path);
    cdm_strlcat(path, "/sys/devices/system/node/", sizeof path);
    cdm_strlcat(path, name, sizeof path);
    int n = cdm_read_file(path, text, sizeof text);
    if (n < 0)
        return n;
    return nm_parse(text, m);
}

int cdm_mems_allowed(struct nodemask *m)
{
    if (cdm_setup() || sys_nodes("has_memory", m)) {
        memset(m, 0, sizeof *m);
        nm_set(m, 0);
        return -1;
    }
    return 0;
}

int cdm_nr_node_ids(void)
{
    struct nodemask m;
    if (cdm_setup() || sys_nodes("possible", &m))
        return 1;
    int last = 0;
    for (int n = nm_first(&m); n >= 0; n = nm_next(&m, n))
        last = n;
    return last + 1;
}

/* Node of a physical frame, from the memory blocks' links in nodeN/. */
static int16_t *block_node;
static unsigned long nblocks, block_pages;

static void learn_blocks(void)
{
    char path[1400], text[64];
    cdm_strlcpy(path, cdm.mount, sizeof path);
    cdm_strlcat(path, "/sys/devices/system/memory/block_size_bytes", sizeof path);
    if (cdm_read_file(path, text, sizeof text) <= 0)
        return;
    block_pages = strtoul(text, NULL, 16) / PAGE;
    if (!block_pages)
        return;
    struct nodemask possible;
    if (sys_nodes("possible", &possible))
        return;
    static char dents[1 << 16];
    for (int pass = 0; pass < 2; pass++) {
        unsigned long maxb = 0;
        for (int n = nm_first(&possible); n >= 0; n = nm_next(&possible, n)) {
            char num[24];
            cdm_strlcpy(path, cdm.mount, sizeof path);
            cdm_strlcat(path, "/sys/devices/system/node/node", sizeof path);
            cdm_strlcat(path, cdm_utoa(num, (unsigned long)n), sizeof path);
            long fd = RAW4(SYS_openat, AT_FDCWD, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
            if (fd < 0)
                continue;
            long got;
            while ((got = RAW3(SYS_getdents64, fd, dents, sizeof dents)) > 0) {
                for (long at = 0; at < got;) {
                    struct dirent64 *d = (struct dirent64 *)(dents + at);
                    if (!strncmp(d->d_name, "memory", 6) && d->d_name[6] >= '0' && d->d_name[6] <= '9') {
                        unsigned long b = strtoul(d->d_name + 6, NULL, 10);
                        if (pass == 0 && b + 1 > maxb)
                            maxb = b + 1;
                        if (pass == 1 && b < nblocks)
                            block_node[b] = (int16_t)n;
                    }
                    at += d->d_reclen;
                }
            }
            RAW1(SYS_close, fd);
        }
        if (pass == 0) {
            if (block_node)
                RAW2(SYS_munmap, block_node, nblocks * sizeof *block_node);
            long p = RAW6(SYS_mmap, 0, (maxb + 1) * sizeof *block_node, 3, 0x22, -1, 0);
            if (p < 0 && p > -4096) {
                block_node = NULL;
                nblocks = 0;
                return;
            }
            block_node = (int16_t *)p;
            nblocks = maxb;
            for (unsigned long b = 0; b < nblocks; b++)
                block_node[b] = -1;
        }
    }
}

static int node_of_pfn(uint64_t pfn)
{
    for (int tries = 0; tries < 2; tries++) {
        if (block_pages && pfn / block_pages < nblocks && block_node[pfn / block_pages] >= 0)
            return block_node[pfn / block_pages];
        learn_blocks();
    }
    return -1;
}

#define PM_PRESENT (1ULL << 63)
#define PM_SWAP (1ULL << 62)
#define PM_PFN ((1ULL << 55) - 1)

/* The node of the page at region offset off of the region in dir (fd of its
 * pagemap given), or -ENOENT if not present (never touched, or in device
 * memory). */
/* A window of pagemap entries read at once (move_pages asks page by page). */
static __thread struct { int fd; uint64_t first, n; uint64_t e[512]; } pm_win
    __attribute__((tls_model("initial-exec")));

static void pm_forget(void)
{
    pm_win.n = 0;
}

static int node_at(int pagemap_fd, uint64_t off)
{
    uint64_t page = off / PAGE, e;
    if (pm_win.fd != pagemap_fd || page < pm_win.first || page >= pm_win.first + pm_win.n) {
        long got = RAW4(SYS_pread64, pagemap_fd, pm_win.e, sizeof pm_win.e, page * 8);
        if (got < 8) {
            pm_win.n = 0;
            return -EFAULT;
        }
        pm_win.fd = pagemap_fd;
        pm_win.first = page;
        pm_win.n = (uint64_t)got / 8;
    }
    e = pm_win.e[page - pm_win.first];
    if (!(e & PM_PRESENT))
        return -ENOENT;
    int n = node_of_pfn(e & PM_PFN);
    return n < 0 ? -ENOENT : n;
}

/* ------------------------------------------------------------ policies */

static const char *const mode_names[] = {
    "default", "preferred", "bind", "interleave", "local", "preferred_many", "weighted_interleave",
};

int mpol_region_str(const struct mpol *p, char *buf, size_t size)
{
    char list[512];
    if (p->mode < 0 || p->mode >= MPOL_MAX)
        return -EINVAL;
    cdm_strlcpy(buf, mode_names[p->mode], size);
    if (p->mode != MPOL_DEFAULT && p->mode != MPOL_LOCAL) {
        cdm_strlcat(buf, ":", size);
        cdm_strlcat(buf, nm_format(&p->nodes, list, sizeof list), size);
    }
    return 0;
}

/* The region's text of a policy back into one ("bind:1"). */
static int mpol_from_region_str(const char *s, struct mpol *p)
{
    memset(p, 0, sizeof *p);
    p->home = -1;
    for (int m = MPOL_MAX - 1; m >= 0; m--) {
        size_t n = strlen(mode_names[m]);
        if (!strncmp(s, mode_names[m], n) && (s[n] == ':' || s[n] == 0 || s[n] == '\n' || s[n] == ' ')) {
            p->mode = m;
            if (s[n] == ':')
                nm_parse(s + n + 1, &p->nodes);
            p->user = p->nodes;
            return 0;
        }
    }
    return -EINVAL;
}

void mpol_env_format(const struct mpol *p, char *buf, size_t size)
{
    char num[24], list[512];
    buf[0] = 0;
    cdm_strlcat(buf, cdm_utoa(num, (unsigned long)p->mode), size);
    cdm_strlcat(buf, ":", size);
    cdm_strlcat(buf, cdm_utoa(num, p->flags), size);
    cdm_strlcat(buf, ":", size);
    cdm_strlcat(buf, nm_format(p->flags & (MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES) ? &p->user : &p->nodes,
                               list, sizeof list), size);
}

static long mpol_create(int mode, unsigned flags, const struct nodemask *user, struct mpol *out);

int mpol_env_parse(const char *text, struct mpol *p)
{
    char *end;
    long mode = strtol(text, &end, 10);
    if (*end != ':')
        return -EINVAL;
    unsigned long flags = strtoul(end + 1, &end, 10);
    if (*end != ':')
        return -EINVAL;
    struct nodemask user;
    if (nm_parse(end + 1, &user))
        return -EINVAL;
    return (int)mpol_create((int)mode, (unsigned)flags, &user, p);
}

/* get_nodes(): a user nodemask of maxnode - 1 bits. */
static long get_nodes(struct nodemask *m, const unsigned long *nmask, unsigned long maxnode)
{
    memset(m, 0, sizeof *m);
    --maxnode;
    if (maxnode == 0 || !nmask)
        return 0;
    if (maxnode > PAGE * 8)
        return -EINVAL;
    for (unsigned long bit = 0; bit < maxnode; bit++) {
        if ((nmask[bit / 64] >> (bit % 64)) & 1) {
            if (bit >= MAX_NODES)
                return -EINVAL;
            nm_set(m, (int)bit);
        }
    }
    return 0;
}

/* mpol_relative_nodemask(): the user's nodes folded onto the allowed ones. */
static void relative(struct nodemask *out, const struct nodemask *user, const struct nodemask *allowed)
{
    int w = nm_weight(allowed);
    memset(out, 0, sizeof *out);
    if (!w)
        return;
    for (int n = nm_first(user); n >= 0; n = nm_next(user, n)) {
        int k = n % w, m = nm_first(allowed);
        while (k--)
            m = nm_next(allowed, m);
        nm_set(out, m);
    }
}

/* sanitize_mpol_flags() + mpol_new() + mpol_set_nodemask(): 0 or -EINVAL.
 * mode carries the mode flags. */
static long mpol_create(int mode, unsigned flags_in, const struct nodemask *user, struct mpol *out)
{
    unsigned flags = ((unsigned)mode & MPOL_MODE_FLAGS) | flags_in;
    mode &= ~MPOL_MODE_FLAGS;
    if ((unsigned)mode >= MPOL_MAX)
        return -EINVAL;
    if ((flags & MPOL_F_STATIC_NODES) && (flags & MPOL_F_RELATIVE_NODES))
        return -EINVAL;
    if ((flags & MPOL_F_NUMA_BALANCING) && mode != MPOL_BIND && mode != MPOL_PREFERRED_MANY)
        return -EINVAL;
    memset(out, 0, sizeof *out);
    out->home = -1;
    out->flags = flags;
    if (mode == MPOL_DEFAULT) {
        if (!nm_empty(user))
            return -EINVAL;
        out->mode = MPOL_DEFAULT;
        out->flags = 0;
        return 0;
    }
    if (mode == MPOL_PREFERRED) {
        if (nm_empty(user)) {
            if (flags & (MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES))
                return -EINVAL;
            mode = MPOL_LOCAL;
        }
    } else if (mode == MPOL_LOCAL) {
        if (!nm_empty(user) || flags & (MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES))
            return -EINVAL;
    } else if (nm_empty(user)) {
        return -EINVAL;
    }
    out->mode = mode;
    out->user = *user;
    if (mode == MPOL_LOCAL)
        return 0;
    struct nodemask allowed, nodes;
    cdm_mems_allowed(&allowed);
    if (flags & MPOL_F_RELATIVE_NODES) {
        relative(&nodes, user, &allowed);
    } else {
        for (int i = 0; i < MASK_WORDS; i++)
            nodes.w[i] = user->w[i] & allowed.w[i];
    }
    if (nm_empty(&nodes))
        return -EINVAL;
    if (mode == MPOL_PREFERRED) {
        int first = nm_first(&nodes);
        memset(&nodes, 0, sizeof nodes);
        nm_set(&nodes, first);
    }
    out->nodes = nodes;
    return 0;
}

static void export_policy(const struct mpol *p)
{
    char text[600];
    mpol_env_format(p, text, sizeof text);
    setenv("CDMFS_RUN_MEMPOLICY", text, 1);
}

/* The task policy the environment carries (from cdmfs run, or across exec). */
void cdm_mempolicy_init(void)
{
    const char *text = getenv("CDMFS_RUN_MEMPOLICY");
    struct mpol p;
    if (!text || mpol_env_parse(text, &p))
        return;
    proc_pol = p;
    char buf[600];
    mpol_region_str(&p, buf, sizeof buf);
    cdm_strlcat(buf, "\n", sizeof buf);
    cdm_write_fd(cdm.fd_policy, buf);
}

long cdm_set_mempolicy(int mode, const unsigned long *nmask, unsigned long maxnode)
{
    struct nodemask user;
    struct mpol p;
    long r = get_nodes(&user, nmask, maxnode);
    if (r)
        return r;
    if ((r = mpol_create(mode, 0, &user, &p)))
        return r;
    if (cdm_setup())
        return -ENOSYS;
    if (is_main_thread()) {
        char buf[600];
        mpol_region_str(&p, buf, sizeof buf);
        cdm_strlcat(buf, "\n", sizeof buf);
        if ((r = cdm_write_fd(cdm.fd_policy, buf)))
            return r;
        proc_pol = p;
        thread_pol_set = 0;
    } else {
        thread_pol = p;
        thread_pol_set = 1;
    }
    if (!cdm_in_lib && !thread_pol_set)
        export_policy(&p);                       /* posix_spawn and system() pass environ on */
    return 0;
}

static int mpol_equal(const struct mpol *a, const struct mpol *b)
{
    return a->mode == b->mode && a->flags == b->flags && !memcmp(&a->nodes, &b->nodes, sizeof a->nodes);
}

/* A thread whose policy is not the process's (the region's): the anonymous
 * memory it maps takes it as a VMA policy (its allocations land there:
 * mimalloc gives each thread its own segments), since the daemon places a
 * page by region and range, not by the faulting thread. */
void cdm_policy_for_mmap(uintptr_t addr, size_t len, uint64_t off)
{
    (void)addr;
    if (!thread_pol_set || mpol_equal(&thread_pol, &proc_pol))
        return;
    char req[700], num[24], pol[600];
    if (thread_pol.mode == MPOL_DEFAULT)
        cdm_strlcpy(pol, "local", sizeof pol);   /* "default" would give the range the region's */
    else
        mpol_region_str(&thread_pol, pol, sizeof pol);
    req[0] = 0;
    cdm_strlcat(req, cdm_utoa(num, off), sizeof req);
    cdm_strlcat(req, " ", sizeof req);
    cdm_strlcat(req, cdm_utoa(num, len), sizeof req);
    cdm_strlcat(req, " ", sizeof req);
    cdm_strlcat(req, pol, sizeof req);
    cdm_strlcat(req, "\n", sizeof req);
    cdm_write_fd(cdm.fd_mbind, req);
}

static void put_nodes(unsigned long *nmask, unsigned long maxnode, const struct nodemask *m)
{
    if (!nmask || maxnode < 2)
        return;
    unsigned long bits = maxnode - 1, words = (bits + 63) / 64;
    for (unsigned long i = 0; i < words; i++)
        nmask[i] = i < MASK_WORDS ? (unsigned long)m->w[i] : 0;
    if (bits % 64)
        nmask[words - 1] &= (1UL << (bits % 64)) - 1;
}

/* The VMA policy at region offset off: the mbind range holding it, if any. */
static int range_policy(uint64_t off, struct mpol *p)
{
    static char text[1 << 16];
    p->mode = MPOL_DEFAULT;
    memset(&p->nodes, 0, sizeof p->nodes);
    p->flags = 0;
    long n = RAW4(SYS_pread64, cdm.fd_mbind, text, sizeof text - 1, 0);
    if (n < 0)
        return (int)n;
    text[n] = 0;
    for (char *line = text; *line;) {
        char *end;
        unsigned long s = strtoul(line, &end, 10), len = strtoul(end, &end, 10);
        while (*end == ' ')
            end++;
        if (off >= s && off < s + len)
            return mpol_from_region_str(end, p);
        char *nl = strchr(line, '\n');
        if (!nl)
            break;
        line = nl + 1;
    }
    return 0;
}

static long touch_page(uint64_t off)
{
    char c;
    return RAW4(SYS_pread64, cdm.fd_data, &c, 1, off);
}

long cdm_get_mempolicy(int *mode, unsigned long *nmask, unsigned long maxnode, void *addr, unsigned long flags)
{
    if (flags & ~(unsigned long)(MPOL_F_NODE | MPOL_F_ADDR | MPOL_F_MEMS_ALLOWED))
        return -EINVAL;
    int nr = cdm_nr_node_ids();
    if (nmask && maxnode < (unsigned long)nr)
        return -EINVAL;
    if (cdm_setup())
        return -ENOSYS;
    struct nodemask m;
    if (flags & MPOL_F_MEMS_ALLOWED) {
        if (flags & (MPOL_F_NODE | MPOL_F_ADDR))
            return -EINVAL;
        if (mode)
            *mode = MPOL_DEFAULT;
        cdm_mems_allowed(&m);
        put_nodes(nmask, maxnode, &m);
        return 0;
    }
    struct mpol pol;
    int is_default;
    long off = -1;
    if (flags & MPOL_F_ADDR) {
        cdm_lock();
        off = cdm_offset_of((uintptr_t)addr, NULL);
        cdm_unlock();
        if (off < 0) {
            int dummy;
            long r = RAW6(SYS_get_mempolicy, &dummy, 0, 0, addr, MPOL_F_ADDR, 0);
            if (r)
                return r;                        /* EFAULT: nothing mapped there */
            pol.mode = MPOL_DEFAULT;
        } else {
            range_policy((uint64_t)off, &pol);
        }
        is_default = pol.mode == MPOL_DEFAULT;
        if (is_default)
            memset(&pol.nodes, 0, sizeof pol.nodes);
    } else if (addr) {
        return -EINVAL;
    } else {
        pol = *task_policy();
        is_default = pol.mode == MPOL_DEFAULT;
    }
    if (flags & MPOL_F_NODE) {
        if (flags & MPOL_F_ADDR) {
            int node = 0;                        /* host memory: node 0 */
            if (off >= 0) {
                long pm;
                char path[1400];
                cdm_strlcpy(path, cdm.dir, sizeof path);
                cdm_strlcat(path, "/pagemap", sizeof path);
                pm = RAW4(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);
                if (pm < 0)
                    return pm;
                pm_forget();
                node = node_at((int)pm, (uint64_t)off);
                if (node == -ENOENT) {           /* faulted in, as get_user_pages does */
                    touch_page((uint64_t)off);
                    pm_forget();
                    node = node_at((int)pm, (uint64_t)off);
                }
                RAW1(SYS_close, pm);
                if (node < 0)
                    return node;
            }
            if (mode)
                *mode = node;
        } else if (!is_default && pol.mode == MPOL_INTERLEAVE && !(flags & MPOL_F_ADDR)) {
            if (mode)
                *mode = nm_first(&pol.nodes);    /* the next interleave node */
        } else {
            return -EINVAL;
        }
    } else if (mode) {
        *mode = (is_default ? MPOL_DEFAULT : pol.mode) | (int)(pol.flags & MPOL_MODE_FLAGS);
    }
    if (nmask) {
        if (!is_default && pol.flags & (MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES))
            m = pol.user;
        else if (is_default || pol.mode == MPOL_LOCAL)
            memset(&m, 0, sizeof m);
        else
            m = pol.nodes;
        put_nodes(nmask, maxnode, &m);
    }
    return 0;
}

/* ------------------------------------------------------------ mbind */

struct mbind_req { const char *policy; unsigned flags; long err; };

static int mbind_piece(uintptr_t addr, size_t len, uint64_t off, void *arg)
{
    (void)addr;
    struct mbind_req *q = arg;
    char req[800], num[24];
    req[0] = 0;
    cdm_strlcat(req, cdm_utoa(num, off), sizeof req);
    cdm_strlcat(req, " ", sizeof req);
    cdm_strlcat(req, cdm_utoa(num, len), sizeof req);
    cdm_strlcat(req, " ", sizeof req);
    cdm_strlcat(req, q->policy, sizeof req);
    if (q->flags & (MPOL_MF_MOVE | MPOL_MF_MOVE_ALL))
        cdm_strlcat(req, " move", sizeof req);
    if (q->flags & MPOL_MF_STRICT)
        cdm_strlcat(req, " strict", sizeof req);
    cdm_strlcat(req, "\n", sizeof req);
    int r = cdm_write_fd(cdm.fd_mbind, req);
    if (r == -EIO)
        q->err = -EIO;                           /* applied; the others go on */
    else if (r)
        return r;
    return 0;
}

long cdm_mbind(void *start, unsigned long len, int mode, const unsigned long *nmask,
               unsigned long maxnode, unsigned flags)
{
    uintptr_t s = (uintptr_t)start;
    if (flags & ~(unsigned)(MPOL_MF_STRICT | MPOL_MF_MOVE | MPOL_MF_MOVE_ALL))
        return -EINVAL;
    if (s & (PAGE - 1))
        return -EINVAL;
    struct nodemask user;
    struct mpol p;
    int m = mode & ~MPOL_MODE_FLAGS;
    if (m == MPOL_DEFAULT)
        flags &= ~(unsigned)MPOL_MF_STRICT;
    len = (len + PAGE - 1) & ~(PAGE - 1);
    uintptr_t e = s + len;
    if (e < s)
        return -EINVAL;
    if (e == s)
        return 0;
    long r = get_nodes(&user, nmask, maxnode);
    if (r)
        return r;
    if ((r = mpol_create(mode, 0, &user, &p)))
        return r;
    if (cdm_setup())
        return -ENOSYS;
    /* The host kernel tells a hole in the range (EFAULT; MPOL_DEFAULT
     * ignores holes), with a harmless local policy taken back at once. */
    if (p.mode != MPOL_DEFAULT) {
        r = RAW6(SYS_mbind, s, len, MPOL_PREFERRED, 0, 0, 0);
        if (r)
            return r;
    }
    RAW6(SYS_mbind, s, len, MPOL_DEFAULT, 0, 0, 0);
    char pol[600];
    mpol_region_str(&p, pol, sizeof pol);
    struct mbind_req q = {pol, flags, 0};
    cdm_lock();
    r = cdm_for_each_piece(s, e, mbind_piece, &q);
    cdm_unlock();
    return r ? r : q.err;
}

/* ------------------------------------------------------------ move_pages, migrate_pages */

/* Another process's region, as the files of MOUNT/regions/PID. */
struct target {
    int self;
    char dir[1200];
    int fd_data, fd_migrate, fd_pagemap;
    /* another process: its mappings of the region's data, from /proc/PID/maps */
    struct { uintptr_t start, end; uint64_t off; } map[512];
    int nmap;
};

static int open_target(int pid, struct target *t)
{
    char num[24], path[1400];
    memset(t, 0, sizeof *t);
    t->fd_data = t->fd_migrate = t->fd_pagemap = -1;
    int me = (int)RAW0(SYS_getpid);
    t->self = pid == 0 || pid == me;
    if (t->self) {
        cdm_strlcpy(t->dir, cdm.dir, sizeof t->dir);
    } else {
        cdm_strlcpy(t->dir, cdm.mount, sizeof t->dir);
        cdm_strlcat(t->dir, "/regions/", sizeof t->dir);
        cdm_strlcat(t->dir, cdm_utoa(num, (unsigned long)pid), sizeof t->dir);
    }
    const char *names[] = {"data", "migrate", "pagemap"};
    int flags[] = {O_RDONLY, O_RDWR, O_RDONLY};
    int *fds[] = {&t->fd_data, &t->fd_migrate, &t->fd_pagemap};
    for (int i = 0; i < 3; i++) {
        cdm_strlcpy(path, t->dir, sizeof path);
        cdm_strlcat(path, "/", sizeof path);
        cdm_strlcat(path, names[i], sizeof path);
        long fd = RAW4(SYS_openat, AT_FDCWD, path, flags[i] | O_CLOEXEC, 0);
        if (fd < 0)
            return (int)fd;
        *fds[i] = (int)fd;
    }
    if (!t->self) {
        static char buf[1 << 16];
        char data_path[1300];
        cdm_strlcpy(data_path, t->dir, sizeof data_path);
        cdm_strlcat(data_path, "/data", sizeof data_path);
        cdm_strlcpy(path, "/proc/", sizeof path);
        cdm_strlcat(path, cdm_utoa(num, (unsigned long)pid), sizeof path);
        cdm_strlcat(path, "/maps", sizeof path);
        long fd = RAW4(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);
        if (fd < 0)
            return -ESRCH;
        size_t have = 0;
        long n;
        while ((n = RAW3(SYS_read, fd, buf + have, sizeof buf - 1 - have)) > 0) {
            have += (size_t)n;
            buf[have] = 0;
            char *line = buf;
            for (char *nl; (nl = strchr(line, '\n'));) {
                *nl = 0;
                char *p = strstr(line, data_path);
                if (p && p[strlen(data_path)] == 0 && t->nmap < 512) {
                    char *q;
                    t->map[t->nmap].start = strtoul(line, &q, 16);
                    t->map[t->nmap].end = strtoul(q + 1, &q, 16);
                    t->map[t->nmap].off = strtoul(q + 6, NULL, 16);
                    t->nmap++;
                }
                line = nl + 1;
            }
            have = strlen(line);
            memmove(buf, line, have);
        }
        RAW1(SYS_close, fd);
    }
    return 0;
}

static void close_target(struct target *t)
{
    if (t->fd_data >= 0) RAW1(SYS_close, t->fd_data);
    if (t->fd_migrate >= 0) RAW1(SYS_close, t->fd_migrate);
    if (t->fd_pagemap >= 0) RAW1(SYS_close, t->fd_pagemap);
}

static long target_offset(struct target *t, uintptr_t addr)
{
    if (t->self) {
        cdm_lock();
        long off = cdm_offset_of(addr, NULL);
        cdm_unlock();
        return off;
    }
    for (int i = 0; i < t->nmap; i++)
        if (addr >= t->map[i].start && addr < t->map[i].end)
            return (long)(t->map[i].off + ((addr & ~(PAGE - 1)) - t->map[i].start));
    return -1;
}

/* Migrates region pages [off, off + len) to node; the pages skipped, with
 * their errnos, go to errs (page index, -errno) as many as fit. */
struct skip { uint64_t first, last; int err; };

static long migrate_run(struct target *t, uint64_t off, uint64_t len, int node,
                        struct skip *skips, int *nskips, int max)
{
    char req[128], num[24];
    req[0] = 0;
    cdm_strlcat(req, cdm_utoa(num, off), sizeof req);
    cdm_strlcat(req, " ", sizeof req);
    cdm_strlcat(req, cdm_utoa(num, len), sizeof req);
    cdm_strlcat(req, " ", sizeof req);
    cdm_strlcat(req, cdm_utoa(num, (unsigned long)node), sizeof req);
    cdm_strlcat(req, "\n", sizeof req);
    int r = cdm_write_fd(t->fd_migrate, req);
    if (r)
        return r;
    static char text[1 << 16];
    long n = RAW4(SYS_pread64, t->fd_migrate, text, sizeof text - 1, 0);
    if (n < 0)
        return n;
    text[n] = 0;
    long skipped = 0;
    for (char *line = text; *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        if (!strncmp(line, "skipped ", 8))
            skipped = strtol(line + 8, NULL, 10);
        else if (!strncmp(line, "page", 4) && *nskips < max) {
            char *p = strchr(line, ' ') + 1, *q;
            uint64_t a = strtoull(p, &q, 10), b = a;
            if (*q == '-')
                b = strtoull(q + 1, &q, 10);
            int err = 0;
            if (strstr(q, "EBUSY")) err = -EBUSY;
            else if (strstr(q, "ENOMEM")) err = -ENOMEM;
            else if (strstr(q, "ENOENT")) err = -ENOENT;
            else if (strstr(q, "EIO")) err = -EIO;
            else err = -EAGAIN;
            skips[(*nskips)++] = (struct skip){a, b, err};
        }
        if (!nl)
            break;
        line = nl + 1;
    }
    return skipped;
}

static int skipped_err(const struct skip *skips, int n, uint64_t page)
{
    for (int i = 0; i < n; i++)
        if (page >= skips[i].first && page <= skips[i].last)
            return skips[i].err;
    return 0;
}

long cdm_move_pages(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags)
{
    if (flags & ~(MPOL_MF_MOVE | MPOL_MF_MOVE_ALL))
        return -EINVAL;
    if (cdm_setup())
        return RAW6(SYS_move_pages, pid, count, pages, nodes, status, flags);
    struct target t;
    int r = open_target(pid, &t);
    pm_forget();
    if (r) {
        close_target(&t);
        /* not a process of this mount: the host's */
        return RAW6(SYS_move_pages, pid, count, pages, nodes, status, flags);
    }
    struct nodemask allowed;
    cdm_mems_allowed(&allowed);
    int nr = cdm_nr_node_ids();
    long ret = 0;
    static struct skip skips[4096];
    for (unsigned long i = 0; i < count; i++) {
        long off = target_offset(&t, (uintptr_t)pages[i]);
        if (nodes) {
            int node = nodes[i];
            /* do_pages_move(): no such node or no memory on it, ENODEV
             * (allowed is the cpuset's mems: N_MEMORY here, so no EACCES) */
            if (node < 0 || node >= nr || !nm_isset(&allowed, node)) {
                ret = -ENODEV;
                break;
            }
        }
        if (off < 0) {
            /* host memory: the host kernel says if it is mapped (-EFAULT)
             * or present (-ENOENT); present, it counts as node 0 and stays */
            int st = 0;
            void *pg = pages[i];
            long h = RAW6(SYS_move_pages, 0, 1, &pg, 0, &st, 0);
            status[i] = h < 0 ? (int)h : st < 0 ? st : 0;
            continue;
        }
        int cur = node_at(t.fd_pagemap, (uint64_t)off);
        if (!nodes || cur < 0 || cur == nodes[i]) {
            status[i] = cur;
            continue;
        }
        /* A run of pages to the same node, contiguous in the region. */
        unsigned long j = i + 1;
        uint64_t end = (uint64_t)off + PAGE;
        while (j < count && nodes[j] == nodes[i] && target_offset(&t, (uintptr_t)pages[j]) == (long)end)
            j++, end += PAGE;
        int nsk = 0;
        long k = migrate_run(&t, (uint64_t)off, end - (uint64_t)off, nodes[i], skips, &nsk, 4096);
        pm_forget();
        if (k < 0) {
            ret = k;
            break;
        }
        for (unsigned long x = i; x < j; x++) {
            uint64_t o = (uint64_t)off + (x - i) * PAGE;
            int err = skipped_err(skips, nsk, o / PAGE);
            if (err == -ENOENT)
                status[x] = -ENOENT;
            else if (err) {
                status[x] = err;
                ret++;
            } else
                status[x] = node_at(t.fd_pagemap, o);
        }
        i = j - 1;
    }
    close_target(&t);
    return ret;
}

/* The node a source maps to (node_remap: the k-th of old onto the k-th of new). */
static int remap_node(int src, const struct nodemask *old, const struct nodemask *new_)
{
    int w = nm_weight(new_), k = 0;
    for (int n = nm_first(old); n >= 0 && n != src; n = nm_next(old, n))
        k++;
    k %= w;
    int d = nm_first(new_);
    while (k--)
        d = nm_next(new_, d);
    return d;
}

long cdm_migrate_pages(int pid, unsigned long maxnode, const unsigned long *old_nodes,
                       const unsigned long *new_nodes)
{
    struct nodemask old, new_;
    long r = get_nodes(&old, old_nodes, maxnode);
    if (r)
        return r;
    if ((r = get_nodes(&new_, new_nodes, maxnode)))
        return r;
    if (cdm_setup())
        return RAW4(SYS_migrate_pages, pid, maxnode, old_nodes, new_nodes);
    struct target t;
    if (open_target(pid, &t)) {
        close_target(&t);
        return RAW4(SYS_migrate_pages, pid, maxnode, old_nodes, new_nodes);
    }
    struct nodemask allowed;
    cdm_mems_allowed(&allowed);
    if (nm_empty(&new_)) {
        close_target(&t);
        return -EINVAL;                          /* as the host kernel answers */
    }
    for (int i = 0; i < MASK_WORDS; i++) {
        if (new_.w[i] & ~allowed.w[i]) {
            close_target(&t);
            return -EINVAL;                      /* not a subset of N_MEMORY */
        }
        old.w[i] &= allowed.w[i];
    }
    long notmoved = 0;
    if (nm_empty(&old) || nm_empty(&new_)) {
        close_target(&t);
        return 0;
    }
    /* Pages of the whole region, by their node: runs go to their new node. */
    uint64_t used = t.self ? cdm_region_used() : 0;
    if (!t.self) {
        for (int i = 0; i < t.nmap; i++) {
            uint64_t e = t.map[i].off + (t.map[i].end - t.map[i].start);
            if (e > used)
                used = e;
        }
    }
    static uint64_t entries[8192];
    static struct skip skips[64];
    uint64_t run_start = 0, run_len = 0;
    int run_to = -1;
    for (uint64_t page = 0; page < used / PAGE; page += 8192) {
        long got = RAW4(SYS_pread64, t.fd_pagemap, entries, sizeof entries, page * 8);
        if (got <= 0)
            break;
        for (long i = 0; i <= got / 8; i++) {
            int to = -1;
            if (i < got / 8 && entries[i] & PM_PRESENT) {
                int n = node_of_pfn(entries[i] & PM_PFN);
                if (n >= 0 && nm_isset(&old, n)) {
                    to = remap_node(n, &old, &new_);
                    if (to == n)
                        to = -1;
                }
            }
            uint64_t o = (page + (uint64_t)i) * PAGE;
            if (run_to >= 0 && (to != run_to || o != run_start + run_len || i == got / 8)) {
                int nsk = 0;
                long k = migrate_run(&t, run_start, run_len, run_to, skips, &nsk, 64);
                if (k > 0)
                    notmoved += k;
                run_to = -1;
            }
            if (to >= 0 && run_to < 0) {
                run_start = o, run_len = PAGE, run_to = to;
            } else if (to >= 0) {
                run_len += PAGE;
            }
        }
    }
    close_target(&t);
    return notmoved;
}

/* EOPNOTSUPP if an mbind range overlapping [off, off + len) is neither bind
 * nor preferred_many. */
static int home_piece(uintptr_t addr, size_t len, uint64_t off, void *arg)
{
    (void)addr, (void)arg;
    static char text[1 << 16];
    long n = RAW4(SYS_pread64, cdm.fd_mbind, text, sizeof text - 1, 0);
    if (n < 0)
        return (int)n;
    text[n] = 0;
    for (char *line = text; *line;) {
        char *end;
        unsigned long s = strtoul(line, &end, 10), l = strtoul(end, &end, 10);
        while (*end == ' ')
            end++;
        struct mpol p;
        if (s < off + len && off < s + l && !mpol_from_region_str(end, &p) &&
            p.mode != MPOL_BIND && p.mode != MPOL_PREFERRED_MANY)
            return -EOPNOTSUPP;
        char *nl = strchr(line, '\n');
        if (!nl)
            break;
        line = nl + 1;
    }
    return 0;
}

long cdm_set_mempolicy_home_node(unsigned long start, unsigned long len, unsigned long home, unsigned long flags)
{
    if (start & (PAGE - 1) || flags)
        return -EINVAL;
    if (home >= MAX_NODES)
        return -EINVAL;
    struct nodemask has;
    if (cdm_setup() || sys_nodes("online", &has) || !nm_isset(&has, (int)home))
        return -EINVAL;
    len = (len + PAGE - 1) & ~(PAGE - 1);
    if (start + len < start)
        return -EINVAL;
    if (start + len == start)
        return 0;
    /* Only bind and preferred_many ranges take a home node (others with a
     * policy: EOPNOTSUPP); the emulated allocator keeps its order by
     * distance from the CPU, so the home node is checked, not used. */
    cdm_lock();
    long err = cdm_for_each_piece(start, start + len, home_piece, NULL);
    cdm_unlock();
    return err;
}

/* ------------------------------------------------------------ the entry points */

long set_mempolicy(int mode, const unsigned long *nmask, unsigned long maxnode)
{
    return cdm_ret(cdm_set_mempolicy(mode, nmask, maxnode));
}

long get_mempolicy(int *mode, unsigned long *nmask, unsigned long maxnode, void *addr, unsigned long flags)
{
    return cdm_ret(cdm_get_mempolicy(mode, nmask, maxnode, addr, flags));
}

long mbind(void *start, unsigned long len, int mode, const unsigned long *nmask, unsigned long maxnode,
           unsigned flags)
{
    return cdm_ret(cdm_mbind(start, len, mode, nmask, maxnode, flags));
}

long move_pages(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags)
{
    return cdm_ret(cdm_move_pages(pid, count, pages, nodes, status, flags));
}

long migrate_pages(int pid, unsigned long maxnode, const unsigned long *old_nodes, const unsigned long *new_nodes)
{
    return cdm_ret(cdm_migrate_pages(pid, maxnode, old_nodes, new_nodes));
}

long set_mempolicy_home_node(unsigned long start, unsigned long len, unsigned long home, unsigned long flags)
{
    return cdm_ret(cdm_set_mempolicy_home_node(start, len, home, flags));
}

long syscall(long nr, ...)
{
    va_list ap;
    long a[6];
    va_start(ap, nr);
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    long r;
    switch (nr) {
    case SYS_set_mempolicy:
        r = cdm_set_mempolicy((int)a[0], (const unsigned long *)a[1], (unsigned long)a[2]);
        break;
    case SYS_get_mempolicy:
        r = cdm_get_mempolicy((int *)a[0], (unsigned long *)a[1], (unsigned long)a[2], (void *)a[3],
                              (unsigned long)a[4]);
        break;
    case SYS_mbind:
        r = cdm_mbind((void *)a[0], (unsigned long)a[1], (int)a[2], (const unsigned long *)a[3],
                      (unsigned long)a[4], (unsigned)a[5]);
        break;
    case SYS_move_pages:
        r = cdm_move_pages((int)a[0], (unsigned long)a[1], (void **)a[2], (const int *)a[3], (int *)a[4],
                           (int)a[5]);
        break;
    case SYS_migrate_pages:
        r = cdm_migrate_pages((int)a[0], (unsigned long)a[1], (const unsigned long *)a[2],
                              (const unsigned long *)a[3]);
        break;
    case SYS_set_mempolicy_home_node:
        r = cdm_set_mempolicy_home_node((unsigned long)a[0], (unsigned long)a[1], (unsigned long)a[2],
                                        (unsigned long)a[3]);
        break;
    default:
        r = cdm_raw(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
    }
    return cdm_ret(r);
}

/* The calling thread's policy as CDMFS_RUN_MEMPOLICY carries it across exec. */
void mpol_current_env(char *buf, size_t size)
{
    mpol_env_format(task_policy(), buf, size);
}

/* A new thread starts with its creator's policy, as clone() copies it; a
 * later set_mempolicy of the creator does not reach it. */
struct start { void *(*fn)(void *); void *arg; struct mpol pol; int set; };

static void *thread_start(void *p)
{
    struct start st = *(struct start *)p;
    free(p);
    if (st.set) {
        thread_pol = st.pol;
        thread_pol_set = 1;
    }
    return st.fn(st.arg);
}

int pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *), void *arg)
{
    static int (*real)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
    if (!real)
        real = (int (*)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *))dlsym(RTLD_NEXT, "pthread_create");
    struct start *st = malloc(sizeof *st);
    if (!st)
        return real(t, attr, fn, arg);
    st->fn = fn;
    st->arg = arg;
    st->pol = *task_policy();
    st->set = 1;
    int r = real(t, attr, thread_start, st);
    if (r)
        free(st);
    return r;
}
