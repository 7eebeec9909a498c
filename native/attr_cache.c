/* attr_cache.c — attribute files answered by the router from rendered bytes
 * (issue 13, build step 3).
 *
 * Python renders an attribute (its show()) and publishes the bytes here,
 * keyed by the inode's nodeid, with the stamp taken before rendering; the
 * router's request thread answers OPEN, READ, FLUSH, FSYNC and RELEASE of
 * a registered attribute from them, and its GETATTR from the attributes
 * Python registered, without a trip to Python.  An OPEN it answers gets
 * fh ATTR_FH | ATTR_FH_DIRECT | nodeid (pyfuse3's fh are small counters:
 * never that high), FOPEN_NOFLUSH and FOPEN_DIRECT_IO: every READ comes
 * here and is answered, whole, from the bytes valid at that moment, as
 * sysfs renders a read.  (The page cache would save that READ, but it cuts
 * or zero-fills what it holds at the kernel's i_size, which content that
 * changes length under it -- a counter gaining a digit -- makes stale
 * between a GETATTR and a READ: wrong bytes.)  GETATTR says 4096, as sysfs.
 * Requests carrying such an fh never reach pyfuse3: what the router cannot
 * answer (the bytes are stale) goes to the side channel, where Python
 * renders, publishes and has the router answer (cdm_router_attr_answer).
 *
 * Validity: two generations.  `hard` moves at the beginning and at the end
 * of every Python request that may change anything (cdm_attr_begin/end,
 * called by the daemon around its handlers); a render made while one is in
 * flight is never valid.  `soft` moves after each READ or WRITE of region
 * data the router served itself (counters: dirty, mapped, pgfault).  Bytes
 * are valid while `hard` has not moved since their stamp and either `soft`
 * has not moved or they were rendered at most `bound` ns ago (1 ms): the
 * staleness the data path may see, traded for not re-rendering in Python
 * on every served data request.  A change through Python is seen at once.
 *
 * The kernel-cached list, the invalidation thread (cdmfs-attrinval) and
 * ksize serve reads through the page cache, which OPEN no longer offers:
 * they stay idle (a READ without ATTR_FH_DIRECT would feed them).
 *
 * Content longer than a page (ATTR_PAGE) is "direct": every READ of it
 * goes to Python.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <linux/fuse.h>

#define BUCKETS 4096
#define ATTR_PAGE 4096
#define DEFAULT_BOUND_NS 1000000ULL

struct attr_entry {
    struct attr_entry *next;            /* hash chain */
    struct attr_entry *knext, *kprev;   /* the kernel-cached list (kcached) */
    uint64_t nodeid;
    unsigned char *data;
    uint32_t len;
    int has_data;           /* published at least once */
    int direct;             /* content beyond a page: never kept, READs to Python */
    int kcached;            /* the kernel's page cache may hold kversion */
    uint64_t hard, soft, rendered;      /* the stamp of the bytes */
    uint64_t version;       /* moves when published bytes differ */
    uint64_t kversion;
    uint64_t ksize;         /* the kernel's i_size may be this small */
    int has_attr;
    struct fuse_attr attr;
};

struct cdm_attr_cache {
    pthread_mutex_t lock;
    pthread_cond_t cond;    /* the invalidation thread's */
    struct attr_entry *buckets[BUCKETS];
    struct attr_entry *klist;
    uint64_t hard, soft;
    uint32_t busy;          /* Python requests that may change things, in flight */
    uint64_t bound_ns;
    int sweep_now;
    uint64_t sweep_at;      /* CLOCK_MONOTONIC ns; 0: none */
    int fuse_fd;
    int running, stopping;
    pthread_t thread;
    struct cdm_attr_stats stats;
};

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static struct attr_entry **slot(struct cdm_attr_cache *c, uint64_t nodeid)
{
    struct attr_entry **p = &c->buckets[(nodeid * 0x9e3779b97f4a7c15ULL) >> 52 & (BUCKETS - 1)];
    while (*p && (*p)->nodeid != nodeid)
        p = &(*p)->next;
    return p;
}

static void kcache_add(struct cdm_attr_cache *c, struct attr_entry *e)
{
    if (e->kcached)
        return;
    e->kcached = 1;
    e->kprev = NULL;
    e->knext = c->klist;
    if (c->klist)
        c->klist->kprev = e;
    c->klist = e;
}

static void kcache_remove(struct cdm_attr_cache *c, struct attr_entry *e)
{
    if (!e->kcached)
        return;
    e->kcached = 0;
    if (e->kprev)
        e->kprev->knext = e->knext;
    else
        c->klist = e->knext;
    if (e->knext)
        e->knext->kprev = e->kprev;
    e->knext = e->kprev = NULL;
}

/* The bytes' generations are current: no change since they were rendered. */
static int exact(const struct cdm_attr_cache *c, const struct attr_entry *e)
{
    return e->has_data && e->hard && e->hard == c->hard && e->soft == c->soft;
}

/* Within the tolerance: only data-path changes since, and rendered at most
 * bound ago. */
static int tolerated(const struct cdm_attr_cache *c, const struct attr_entry *e, uint64_t now)
{
    return e->has_data && e->hard && e->hard == c->hard && now - e->rendered <= c->bound_ns;
}

static void schedule_sweep(struct cdm_attr_cache *c, uint64_t at)
{
    if (!c->sweep_at || at < c->sweep_at) {
        c->sweep_at = at;
        pthread_cond_signal(&c->cond);
    }
}

/* ------------------------------------------------------------ the thread */

static void *inval_loop(void *arg)
{
    struct cdm_attr_cache *c = arg;
    uint64_t cap = 64, *ids = malloc(cap * sizeof(*ids));
    pthread_mutex_lock(&c->lock);
    while (!c->stopping) {
        uint64_t now = mono_ns();
        if (!c->sweep_now && !(c->sweep_at && now >= c->sweep_at)) {
            if (c->sweep_at) {
                struct timespec ts = {(time_t)(c->sweep_at / 1000000000ULL),
                                      (long)(c->sweep_at % 1000000000ULL)};
                pthread_cond_timedwait(&c->cond, &c->lock, &ts);
            } else {
                pthread_cond_wait(&c->cond, &c->lock);
            }
            continue;
        }
        c->sweep_now = 0;
        c->sweep_at = 0;
        uint64_t n = 0;
        struct attr_entry *e = c->klist;
        while (e) {
            struct attr_entry *next = e->knext;
            int same = e->kversion == e->version;   /* the kernel holds the bytes published */
            if (same && exact(c, e)) {
                /* still good */
            } else if (same && tolerated(c, e, now)) {
                schedule_sweep(c, e->rendered + c->bound_ns + 1);
            } else {
                if (n == cap) {
                    uint64_t *more = ids ? realloc(ids, 2 * cap * sizeof(*ids)) : NULL;
                    if (!more) {
                        c->sweep_now = 1;   /* the rest next round */
                        break;
                    }
                    ids = more;
                    cap *= 2;
                }
                ids[n++] = e->nodeid;
                kcache_remove(c, e);
            }
            e = next;
        }
        int fd = c->fuse_fd;
        pthread_mutex_unlock(&c->lock);
        uint64_t done = 0;
        for (uint64_t i = 0; i < n; i++) {
            /* -ENOENT: the kernel has forgotten the inode; nothing to drop. */
            int rc = cdm_fuse_inval(fd, ids[i], 0, 0);
            if (rc == 0 || rc == -ENOENT)
                done++;
        }
        pthread_mutex_lock(&c->lock);
        c->stats.invalidations += done;
    }
    pthread_mutex_unlock(&c->lock);
    free(ids);
    return NULL;
}

/* ------------------------------------------------------------ the router's side */

struct cdm_attr_cache *attr_cache_new(void)
{
    struct cdm_attr_cache *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    pthread_mutex_init(&c->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cond, &ca);
    pthread_condattr_destroy(&ca);
    c->hard = 1;            /* a stamp's hard 0: never valid */
    c->bound_ns = DEFAULT_BOUND_NS;
    c->fuse_fd = -1;
    return c;
}

int attr_cache_start(struct cdm_attr_cache *c, int fuse_fd)
{
    if (c->running)
        return -EBUSY;
    c->fuse_fd = fuse_fd;
    c->stopping = 0;
    int err = pthread_create(&c->thread, NULL, inval_loop, c);
    if (err)
        return -err;
    pthread_setname_np(c->thread, "cdmfs-attrinval");
    c->running = 1;
    return 0;
}

void attr_cache_stop(struct cdm_attr_cache *c)
{
    if (!c->running)
        return;
    pthread_mutex_lock(&c->lock);
    c->stopping = 1;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->thread, NULL);
    c->running = 0;
}

void attr_cache_free(struct cdm_attr_cache *c)
{
    if (!c)
        return;
    attr_cache_stop(c);
    for (int i = 0; i < BUCKETS; i++) {
        while (c->buckets[i]) {
            struct attr_entry *e = c->buckets[i];
            c->buckets[i] = e->next;
            free(e->data);
            free(e);
        }
    }
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
}

void attr_cache_data_changed(struct cdm_attr_cache *c)
{
    pthread_mutex_lock(&c->lock);
    c->soft++;
    if (c->klist)
        schedule_sweep(c, mono_ns() + c->bound_ns);
    pthread_mutex_unlock(&c->lock);
}

static size_t reply_header(unsigned char *out, uint64_t unique, size_t body)
{
    struct fuse_out_header oh = {(uint32_t)(sizeof(oh) + body), 0, unique};
    memcpy(out, &oh, sizeof(oh));
    return sizeof(oh) + body;
}

int attr_cache_handle(struct cdm_attr_cache *c, const unsigned char *req, size_t len, int force,
                      unsigned char *out, size_t outsize)
{
    const struct fuse_in_header *ih = (const void *)req;
    const unsigned char *body = req + sizeof(*ih);
    size_t blen = len - sizeof(*ih);
    const size_t oh = sizeof(struct fuse_out_header);
    uint64_t fh;

    switch (ih->opcode) {
    case FUSE_GETATTR: {
        struct fuse_attr_out ao = {0};
        if (outsize < oh + sizeof(ao))
            return ATTR_FORWARD;
        pthread_mutex_lock(&c->lock);
        struct attr_entry *e = *slot(c, ih->nodeid);
        if (!e || !e->has_attr) {
            pthread_mutex_unlock(&c->lock);
            return ATTR_FORWARD;
        }
        ao.attr = e->attr;
        ao.attr_valid = CDM_ATTR_TIMEOUT;
        /* A page, as sysfs says: reads are direct, whatever the length. */
        c->stats.getattrs++;
        pthread_mutex_unlock(&c->lock);
        memcpy(out + oh, &ao, sizeof(ao));
        return (int)reply_header(out, ih->unique, sizeof(ao));
    }
    case FUSE_OPEN: {
        struct fuse_open_in in;
        struct fuse_open_out oo = {0};
        if (blen < sizeof(in) || outsize < oh + sizeof(oo))
            return ATTR_FORWARD;
        memcpy(&in, body, sizeof(in));
        /* Writes, and O_TRUNC (libfuse's atomic_o_trunc), are Python's. */
        if ((in.flags & O_ACCMODE) != O_RDONLY || (in.flags & O_TRUNC))
            return ATTR_FORWARD;
        pthread_mutex_lock(&c->lock);
        struct attr_entry *e = *slot(c, ih->nodeid);
        if (!e) {
            pthread_mutex_unlock(&c->lock);
            return ATTR_FORWARD;
        }
        if (e->direct) {
            oo.fh = CDM_ATTR_FH | CDM_ATTR_FH_DIRECT | ih->nodeid;
            oo.open_flags = FOPEN_DIRECT_IO | FOPEN_NOFLUSH;
        } else {
            uint64_t now = mono_ns();
            if (force ? !e->has_data : !(exact(c, e) || tolerated(c, e, now))) {
                c->stats.open_misses += !force;
                pthread_mutex_unlock(&c->lock);
                return force ? ATTR_FORWARD : ATTR_SIDE;
            }
            /* Direct I/O: each READ is answered here from the bytes valid
             * then, whole; the kernel's page cache would cut or zero-fill
             * them at an i_size that content changing under it (a counter
             * growing a digit) makes stale between a GETATTR and a READ.
             * fh carries the version of the bytes (see FUSE_READ). */
            oo.fh = CDM_ATTR_FH | CDM_ATTR_FH_DIRECT | (e->version & CDM_ATTR_FH_VERSION);
            oo.open_flags = FOPEN_DIRECT_IO | FOPEN_NOFLUSH;
        }
        c->stats.opens++;
        pthread_mutex_unlock(&c->lock);
        memcpy(out + oh, &oo, sizeof(oo));
        return (int)reply_header(out, ih->unique, sizeof(oo));
    }
    case FUSE_READ: {
        struct fuse_read_in in;
        if (blen < sizeof(in))
            return ATTR_FORWARD;
        memcpy(&in, body, sizeof(in));
        if (!(in.fh & CDM_ATTR_FH))
            return ATTR_FORWARD;    /* opened by Python */
        pthread_mutex_lock(&c->lock);
        struct attr_entry *e = *slot(c, ih->nodeid);
        uint64_t now = mono_ns();
        int ok = e && !e->direct && (force ? e->has_data : (exact(c, e) || tolerated(c, e, now)));
        /* A read that goes on from an offset past 0 continues the
         * rendering the open saw (its version is in fh), as sysfs serves an
         * open file from the one rendering: if the bytes have changed since,
         * it is at the end (a reader that took the whole rendering at once,
         * as cat does, sees exactly it; one reading in small pieces across
         * a change gets a short file, never a mix of two renderings). */
        int moved = in.offset > 0 && ok &&
                    (in.fh & CDM_ATTR_FH_VERSION) != (e->version & CDM_ATTR_FH_VERSION);
        uint64_t n = ok && !moved && in.offset < e->len ? e->len - in.offset : 0;
        if (n > in.size)
            n = in.size;
        if (!ok || outsize < oh + n) {
            if (!force)
                c->stats.read_misses++;
            pthread_mutex_unlock(&c->lock);
            return force ? ATTR_FORWARD : ATTR_SIDE;
        }
        memcpy(out + oh, e->data + (n ? in.offset : 0), n);
        if (!(in.fh & CDM_ATTR_FH_DIRECT) && !(in.flags & O_DIRECT)) {
            /* Into the page cache: the kernel holds these bytes now, and a
             * short READ moves its i_size to where it ended. */
            kcache_add(c, e);
            e->kversion = e->version;
            if (n < in.size && in.offset + n < e->ksize)
                e->ksize = in.offset + n;
            if (!exact(c, e))
                schedule_sweep(c, e->rendered + c->bound_ns + 1);
        }
        c->stats.reads++;
        pthread_mutex_unlock(&c->lock);
        return (int)reply_header(out, ih->unique, n);
    }
    case FUSE_FLUSH:
    case FUSE_FSYNC:
    case FUSE_RELEASE:
    case FUSE_IOCTL:
    case FUSE_POLL: {
        /* fuse_flush_in, fuse_fsync_in, fuse_release_in, fuse_ioctl_in and
         * fuse_poll_in all begin with fh. */
        if (blen < sizeof(fh))
            return ATTR_FORWARD;
        memcpy(&fh, body, sizeof(fh));
        if (!(fh & CDM_ATTR_FH))
            return ATTR_FORWARD;
        if (ih->opcode == FUSE_RELEASE) {
            pthread_mutex_lock(&c->lock);
            c->stats.releases++;
            pthread_mutex_unlock(&c->lock);
        }
        size_t n = reply_header(out, ih->unique, 0);
        /* As sysfs: no ioctl (isatty() asks TCGETS).  POLL: as pyfuse3
         * answers it (the kernel then polls as for any file). */
        if (ih->opcode == FUSE_IOCTL)
            ((struct fuse_out_header *)out)->error = -ENOTTY;
        else if (ih->opcode == FUSE_POLL)
            ((struct fuse_out_header *)out)->error = -ENOSYS;
        return (int)n;
    }
    default:
        return ATTR_FORWARD;
    }
}

/* ------------------------------------------------------------ Python's side */

int cdm_attr_register(struct cdm_attr_cache *c, uint64_t nodeid, uint32_t mode, uint32_t uid,
                      uint32_t gid, uint64_t size, int64_t atime_ns, int64_t mtime_ns,
                      int64_t ctime_ns)
{
    if (!c)
        return -EINVAL;
    pthread_mutex_lock(&c->lock);
    struct attr_entry **p = slot(c, nodeid), *e = *p;
    if (!e) {
        e = calloc(1, sizeof(*e));
        if (!e) {
            pthread_mutex_unlock(&c->lock);
            return -ENOMEM;
        }
        e->nodeid = nodeid;
        e->ksize = size;
        *p = e;
        c->stats.entries++;
    }
    struct fuse_attr a = {0};
    a.ino = nodeid;
    a.size = size;
    a.atime = (uint64_t)(atime_ns / 1000000000);
    a.atimensec = (uint32_t)(atime_ns % 1000000000);
    a.mtime = (uint64_t)(mtime_ns / 1000000000);
    a.mtimensec = (uint32_t)(mtime_ns % 1000000000);
    a.ctime = (uint64_t)(ctime_ns / 1000000000);
    a.ctimensec = (uint32_t)(ctime_ns % 1000000000);
    a.mode = mode;
    a.nlink = 1;
    a.uid = uid;
    a.gid = gid;
    a.blksize = ATTR_PAGE;
    e->attr = a;
    e->has_attr = 1;
    pthread_mutex_unlock(&c->lock);
    return 0;
}

void cdm_attr_stamp(struct cdm_attr_cache *c, uint64_t *stamp)
{
    pthread_mutex_lock(&c->lock);
    stamp[0] = c->busy ? 0 : c->hard;
    stamp[1] = c->soft;
    stamp[2] = mono_ns();
    pthread_mutex_unlock(&c->lock);
}

int cdm_attr_publish(struct cdm_attr_cache *c, uint64_t nodeid, const uint64_t *stamp,
                     const void *data, size_t len)
{
    unsigned char *copy = NULL;
    if (len <= ATTR_PAGE) {
        copy = malloc(len ? len : 1);
        if (!copy)
            return -ENOMEM;
        memcpy(copy, data, len);
    }
    pthread_mutex_lock(&c->lock);
    struct attr_entry *e = *slot(c, nodeid);
    if (!e) {
        pthread_mutex_unlock(&c->lock);
        free(copy);
        return -ENOENT;
    }
    c->stats.publishes++;
    if (!copy) {
        /* Beyond a page: the kernel could not read it through its cache
         * (i_size is a page), so it is read directly from now on. */
        e->direct = 1;
        free(e->data);
        e->data = NULL;
        e->len = 0;
        e->has_data = 0;
        kcache_remove(c, e);
        pthread_mutex_unlock(&c->lock);
        return 1;
    }
    if (!e->has_data || e->len != len || memcmp(e->data, copy, len)) {
        e->version++;
        c->stats.changed++;
        if (e->kcached) {
            /* A file held open would read the old bytes from the kernel's copy. */
            c->sweep_now = 1;
            pthread_cond_signal(&c->cond);
        }
    }
    free(e->data);
    e->data = copy;
    e->len = (uint32_t)len;
    e->has_data = 1;
    e->direct = 0;
    e->hard = stamp[0];
    e->soft = stamp[1];
    e->rendered = stamp[2];
    pthread_mutex_unlock(&c->lock);
    return 0;
}

int cdm_attr_drop(struct cdm_attr_cache *c, uint64_t nodeid)
{
    pthread_mutex_lock(&c->lock);
    struct attr_entry **p = slot(c, nodeid), *e = *p;
    if (e) {
        kcache_remove(c, e);
        *p = e->next;
        c->stats.entries--;
    }
    pthread_mutex_unlock(&c->lock);
    if (!e)
        return -ENOENT;
    free(e->data);
    free(e);
    return 0;
}

void cdm_attr_begin(struct cdm_attr_cache *c)
{
    pthread_mutex_lock(&c->lock);
    c->busy++;
    c->hard++;
    if (c->klist) {
        c->sweep_now = 1;
        pthread_cond_signal(&c->cond);
    }
    pthread_mutex_unlock(&c->lock);
}

void cdm_attr_end(struct cdm_attr_cache *c)
{
    pthread_mutex_lock(&c->lock);
    if (c->busy)
        c->busy--;
    c->hard++;
    if (c->klist) {
        c->sweep_now = 1;
        pthread_cond_signal(&c->cond);
    }
    pthread_mutex_unlock(&c->lock);
}

void cdm_attr_set_bound(struct cdm_attr_cache *c, uint64_t ns)
{
    pthread_mutex_lock(&c->lock);
    c->bound_ns = ns;
    pthread_mutex_unlock(&c->lock);
}

void cdm_attr_stats(struct cdm_attr_cache *c, struct cdm_attr_stats *out)
{
    pthread_mutex_lock(&c->lock);
    *out = c->stats;
    out->hard = c->hard;
    out->soft = c->soft;
    out->busy = c->busy;
    uint64_t k = 0;
    for (struct attr_entry *e = c->klist; e; e = e->knext)
        k++;
    out->kernel_cached = k;
    pthread_mutex_unlock(&c->lock);
}
