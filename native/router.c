/* router.c — the request router between /dev/fuse and pyfuse3 (issue 13).
 *
 * The router opens /dev/fuse and mounts it with mount(2) itself; pyfuse3
 * runs unmodified on one end of a SOCK_SEQPACKET socketpair, given to it as
 * the mountpoint "/dev/fd/N" (libfuse 3.14 takes such a descriptor as
 * already mounted).  Three kinds of threads, none of which runs Python:
 *
 *   request  (one reader, or more on clones of the descriptor: see
 *            cdm_router_tune and request_loop) reads each request from
 *            /dev/fuse and sends it, one message,
 *            to the socket.  A request that gets a reply is recorded first
 *            (unique -> the descriptor it came from, its opcode) so that its
 *            reply goes back to that descriptor and, if the Python side goes
 *            away, it can be failed with EIO; FORGET, BATCH_FORGET,
 *            NOTIFY_REPLY and INTERRUPT get no reply and are not recorded.
 *            At ENODEV (unmounted, or the connection aborted) it tells
 *            Python through an eventfd and ends.
 *   reply    reads each message of the Python side and writes it to
 *            /dev/fuse: replies to the descriptor their request came from
 *            (learning the negotiated parameters from INIT's reply), and
 *            notifications (unique 0) through the notifier.  At the end of
 *            the socket (Python closed its end, or died) every recorded
 *            request is failed with EIO and the router answers further
 *            requests with EIO itself, so nothing waits for a reply that
 *            cannot come.
 *   notifier writes notifications.  A FUSE_NOTIFY_INVAL_INODE blocks on the
 *            folio lock of any READ in flight on its range (DESIGN §5): the
 *            thread that delivers READ replies must never be the one that
 *            waits, so they are queued to a thread of their own.
 *
 * The side channel: requests whose opcode Python registered (cdm_router_route:
 * FUSE_LSEEK and FUSE_FALLOCATE, which pyfuse3 has no handlers for) are
 * recorded as any other but sent, whole, to a second SOCK_SEQPACKET
 * socketpair that Python reads itself (trio, side_fd); Python answers with
 * cdm_router_reply(), which writes to the descriptor the request came from
 * and takes it out of the table.  The same table: if Python goes away they
 * fail with EIO like forwarded requests.  An INTERRUPT of a side-channel
 * request is dropped (libfuse would keep it for a request it never sees);
 * the reply still comes.
 *
 * INIT's reply loses FUSE_AUTO_INVAL_DATA on its way: with it the kernel
 * drops a file's whole page cache (the emulated CPU's mappings) whenever it
 * sees the file's mtime change, and pyfuse3 offers no way to turn it off.
 *
 * Region data (build step 2): Python maps the data inode of each region to
 * its native region (cdm_router_map_data).  The request thread offers a READ
 * or WRITE of a mapped inode to cdm_region_serve() first, which copies under
 * the machine's mutex when every page is present and plain; the reply
 * (fuse_out_header and the bytes, or fuse_write_out) is written from here and
 * the request never enters the table.  Anything else (first touch, a page in
 * device memory, locked, poisoned, past the end) is forwarded as before.  A
 * mapping's use count, under r->lock, covers the copy only (not the write to
 * /dev/fuse): cdm_router_unmap_data() waits for it to drop to zero, so the
 * region is never used once unmapped.  An INTERRUPT of a request not in the
 * table (served here, or answered already) is dropped: nobody waits for it.
 *
 * Attribute files (build step 3, attr_cache.c): each request is offered to
 * attr_cache_handle() first, which answers a read-only OPEN, READ, FLUSH,
 * FSYNC, IOCTL, POLL and RELEASE of a registered attribute inode (its
 * handles have CDM_ATTR_FH set: pyfuse3 never sees them) and its GETATTR
 * from the bytes Python published, or sends the OPEN/READ to the side
 * channel when they are stale (Python renders and calls
 * cdm_router_attr_answer); a READ or WRITE served by cdm_region_serve moves
 * the cache's data generation.
 *
 * /dev/fuse is read non-blocking: when it has nothing, the request thread
 * sleeps in poll() on it and on a stop eventfd, so that cdm_router_stop()
 * can end it whatever the mount does.  Writes to it are unaffected.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <stddef.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/fuse.h>

/* The kernel's fs/fuse/dev.c: ordinary requests have even uniques, the
 * INTERRUPT of a request has its unique with this bit set. */
#define FUSE_INT_REQ_BIT 1ULL
/* libfuse's read buffer (FUSE_MAX_MAX_PAGES pages and FUSE_BUFFER_HEADER_SIZE
 * bytes of headers): libfuse never negotiates a max_write beyond it.  The
 * request buffer has this size until INIT's reply, then max_write plus
 * HEADER_ROOM, as libfuse's. */
#define HEADER_ROOM 0x1000
#define DEFAULT_BUFSIZE (256 * CDM_PAGE_SIZE + HEADER_ROOM)
/* Socket buffers: a whole WRITE (max_write plus headers) must fit in one
 * message, with room for a few more queued behind it. */
#define SOCKET_BUFFER (4 << 20)

struct entry {
    uint64_t unique;        /* 0: empty slot */
    int32_t fd;             /* the descriptor the request was read from */
    uint32_t opcode;
    int side;               /* sent to the side channel */
};

struct data_map {
    struct data_map *next;
    uint64_t nodeid;
    struct cdm_machine *m;
    struct cdm_region *region;
    uint32_t uses;          /* router copies in flight */
    uint64_t read_ns, write_ns;   /* last served (cdm_router_data_times) */
};

#define DATA_BUCKETS 1024

struct note {
    struct note *next;
    size_t len;
    unsigned char msg[];
};

struct cdm_router {
    int fuse_fd;            /* /dev/fuse, mounted */
    int sock;               /* the router's end of the socketpair */
    int python_fd;          /* pyfuse3's end (libfuse closes it) */
    int event_fd;           /* to Python: the router has ended (see state) */
    int stop_fd;            /* from cdm_router_stop(): end the request thread */
    int side_sock;          /* the router's end of the side channel */
    int side_python_fd;     /* Python's end of it (the router closes it in free) */
    int mounted;            /* mount(2) succeeded */
    int started;
    pthread_t reply_thread, notify_thread;
    uint32_t nreaders;      /* request threads (cdm_router_tune) */
    uint64_t last_reply_ns; /* when a reply was last delivered (atomic) */
    uint64_t spin_ns;       /* their longest spin */
    struct reader {
        struct cdm_router *r;
        int fd;             /* fuse_fd for the first, a clone for the others */
        pthread_t thread;
    } readers[CDM_ROUTER_MAX_READERS];

    pthread_mutex_t lock;   /* everything below */
    int state;              /* CDM_ROUTER_* */
    int stopping;
    uint64_t side_mask;     /* opcodes (< 64) sent to the side channel */
    struct entry *table;    /* forwarded requests awaiting a reply: open addressing */
    uint64_t table_cap;     /* a power of two */
    uint64_t table_used;
    struct cdm_router_init init;
    struct cdm_router_stats stats;
    uint64_t want_bufsize;  /* the request buffer the negotiated max_write needs */
    struct note *notes, **notes_tail;
    pthread_cond_t notes_cond;
    struct data_map *data[DATA_BUCKETS];
    pthread_cond_t data_cond;   /* a mapping's uses fell to zero */
    struct cdm_attr_cache *attrs;   /* attribute files served in C (attr_cache.c) */
};

/* ------------------------------------------------------------ the table */

static uint64_t slot_of(const struct cdm_router *r, uint64_t unique)
{
    return ((unique >> 1) * 0x9e3779b97f4a7c15ULL) >> 32 & (r->table_cap - 1);
}

static int table_grow(struct cdm_router *r)
{
    uint64_t cap = r->table_cap ? r->table_cap * 2 : 1024;
    struct entry *t = calloc(cap, sizeof(*t));
    if (!t)
        return -ENOMEM;
    struct entry *old = r->table;
    uint64_t oldcap = r->table_cap;
    r->table = t;
    r->table_cap = cap;
    for (uint64_t i = 0; i < oldcap; i++) {
        if (!old[i].unique)
            continue;
        uint64_t s = slot_of(r, old[i].unique);
        while (t[s].unique)
            s = (s + 1) & (cap - 1);
        t[s] = old[i];
    }
    free(old);
    return 0;
}

/* Caller holds r->lock. */
static int table_insert(struct cdm_router *r, uint64_t unique, int fd, uint32_t opcode, int side)
{
    if ((r->table_used + 1) * 2 > r->table_cap && table_grow(r) < 0)
        return -ENOMEM;
    uint64_t s = slot_of(r, unique);
    while (r->table[s].unique && r->table[s].unique != unique)
        s = (s + 1) & (r->table_cap - 1);
    if (!r->table[s].unique)
        r->table_used++;
    r->table[s] = (struct entry){unique, fd, opcode, side};
    return 0;
}

/* unique's entry, or NULL.  Caller holds r->lock. */
static struct entry *table_find(struct cdm_router *r, uint64_t unique)
{
    if (!r->table_cap)
        return NULL;
    uint64_t s = slot_of(r, unique);
    while (r->table[s].unique) {
        if (r->table[s].unique == unique)
            return &r->table[s];
        s = (s + 1) & (r->table_cap - 1);
    }
    return NULL;
}

/* Removes unique; its entry into *out.  1 if it was there.  Caller holds
 * r->lock.  Deletion shifts the entries after it back (linear probing keeps
 * no tombstones). */
static int table_remove(struct cdm_router *r, uint64_t unique, struct entry *out)
{
    if (!r->table_cap)
        return 0;
    uint64_t mask = r->table_cap - 1, s = slot_of(r, unique);
    while (r->table[s].unique != unique) {
        if (!r->table[s].unique)
            return 0;
        s = (s + 1) & mask;
    }
    *out = r->table[s];
    uint64_t hole = s;
    for (uint64_t j = (s + 1) & mask; r->table[j].unique; j = (j + 1) & mask) {
        uint64_t home = slot_of(r, r->table[j].unique);
        /* j's entry may fill the hole unless its home lies in (hole, j]. */
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            r->table[hole] = r->table[j];
            hole = j;
        }
    }
    r->table[hole].unique = 0;
    r->table_used--;
    return 1;
}

/* ------------------------------------------------------------ /dev/fuse */

static void write_fuse(struct cdm_router *r, int fd, const void *msg, size_t len)
{
    ssize_t n;
    do
        n = write(fd, msg, len);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        /* ENOENT: the request was interrupted or aborted meanwhile;
         * ENODEV: the connection is gone.  Either way nobody waits. */
        pthread_mutex_lock(&r->lock);
        r->stats.write_errors++;
        r->stats.last_write_errno = errno;
        pthread_mutex_unlock(&r->lock);
    }
}

static void reply_error(struct cdm_router *r, int fd, uint64_t unique, int err)
{
    struct fuse_out_header oh = {sizeof(oh), -err, unique};
    write_fuse(r, fd, &oh, sizeof(oh));
}

static void signal_python(struct cdm_router *r)
{
    uint64_t one = 1;
    ssize_t n = write(r->event_fd, &one, sizeof(one));
    (void)n;   /* EAGAIN: the counter is set already */
}

/* The Python side is gone (its end of the socket closed, or sending to it
 * failed): every recorded request fails with EIO, and from now on the
 * request thread answers requests itself. */
static void python_gone(struct cdm_router *r)
{
    pthread_mutex_lock(&r->lock);
    if (r->state & CDM_ROUTER_PYTHON_GONE) {
        pthread_mutex_unlock(&r->lock);
        return;
    }
    r->state |= CDM_ROUTER_PYTHON_GONE;
    struct entry *t = r->table;
    uint64_t cap = r->table_cap;
    r->table = NULL;
    r->table_cap = r->table_used = 0;
    pthread_mutex_unlock(&r->lock);
    uint64_t failed = 0;
    for (uint64_t i = 0; i < cap; i++) {
        if (t[i].unique) {
            reply_error(r, t[i].fd, t[i].unique, EIO);
            failed++;
        }
    }
    free(t);
    pthread_mutex_lock(&r->lock);
    r->stats.failed += failed;
    pthread_mutex_unlock(&r->lock);
    signal_python(r);
}

static int no_reply(uint32_t opcode)
{
    return opcode == FUSE_FORGET || opcode == FUSE_BATCH_FORGET ||
           opcode == FUSE_NOTIFY_REPLY || opcode == FUSE_INTERRUPT;
}

/* to_side: to the side channel whatever the opcode (an attribute file's
 * OPEN or READ whose bytes are stale, attr_cache.c). */
static void forward_request(struct cdm_router *r, int fd, unsigned char *buf, size_t len,
                            int to_side)
{
    const struct fuse_in_header *ih = (const void *)buf;
    uint64_t unique = ih->unique;
    uint32_t opcode = ih->opcode;
    int quiet = no_reply(opcode);

    pthread_mutex_lock(&r->lock);
    r->stats.requests++;
    int side = to_side || (opcode < 64 && (r->side_mask >> opcode & 1));
    if (opcode == FUSE_INTERRUPT && len >= sizeof(*ih) + sizeof(struct fuse_interrupt_in)) {
        struct fuse_interrupt_in in;
        memcpy(&in, buf + sizeof(*ih), sizeof(in));
        struct entry *e = table_find(r, in.unique);
        if (!e && !(r->state & CDM_ROUTER_PYTHON_GONE)) {
            /* Served by the router (or answered already): no reply to interrupt. */
            r->stats.interrupts_stale++;
            pthread_mutex_unlock(&r->lock);
            return;
        }
        if (e && e->side) {
            /* Python answers side-channel requests soon; the reply comes. */
            r->stats.interrupts_dropped++;
            pthread_mutex_unlock(&r->lock);
            return;
        }
    }
    if (opcode == FUSE_INIT && len >= sizeof(*ih) + 5 * sizeof(uint32_t)) {
        struct fuse_init_in in = {0};
        size_t n = len - sizeof(*ih);
        memcpy(&in, buf + sizeof(*ih), n < sizeof(in) ? n : sizeof(in));
        r->init.kernel_major = in.major;
        r->init.kernel_minor = in.minor;
        r->init.kernel_max_readahead = in.max_readahead;
        r->init.kernel_flags = in.flags;
        r->init.kernel_flags2 = in.minor >= 36 ? in.flags2 : 0;
    }
    if (r->state & CDM_ROUTER_PYTHON_GONE) {
        if (!quiet)
            r->stats.failed++;
        pthread_mutex_unlock(&r->lock);
        if (!quiet)
            reply_error(r, fd, unique, EIO);
        return;
    }
    if (quiet) {
        r->stats.no_reply++;
    } else if (table_insert(r, unique, fd, opcode, side) < 0) {
        r->stats.failed++;
        pthread_mutex_unlock(&r->lock);
        reply_error(r, fd, unique, ENOMEM);
        return;
    }
    pthread_mutex_unlock(&r->lock);

    ssize_t n;
    do
        n = send(side ? r->side_sock : r->sock, buf, len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n == (ssize_t)len) {
        pthread_mutex_lock(&r->lock);
        if (side)
            r->stats.side++;
        else
            r->stats.forwarded++;
        pthread_mutex_unlock(&r->lock);
        return;
    }
    /* EPIPE/ECONNRESET: Python closed its end (also: stopping).  This
     * request is in the table and fails with the others. */
    python_gone(r);
}

/* ------------------------------------------------------------ region data */

static struct data_map **data_slot(struct cdm_router *r, uint64_t nodeid)
{
    struct data_map **p = &r->data[(nodeid * 0x9e3779b97f4a7c15ULL) >> 54 & (DATA_BUCKETS - 1)];
    while (*p && (*p)->nodeid != nodeid)
        p = &(*p)->next;
    return p;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A READ or WRITE of a mapped inode: served here if cdm_region_serve takes
 * it (1), else 0 (forward it).  out holds outsize bytes. */
static int serve_data(struct cdm_router *r, int fd, unsigned char *buf, size_t len,
                      unsigned char *out, size_t outsize)
{
    const struct fuse_in_header *ih = (const void *)buf;
    int write = ih->opcode == FUSE_WRITE;
    uint64_t off, size;
    unsigned char *data;
    if (write) {
        struct fuse_write_in in;
        if (len < sizeof(*ih) + sizeof(in))
            return 0;
        memcpy(&in, buf + sizeof(*ih), sizeof(in));
        if (len - sizeof(*ih) - sizeof(in) < in.size)
            return 0;
        off = in.offset;
        size = in.size;
        data = buf + sizeof(*ih) + sizeof(in);
    } else {
        struct fuse_read_in in;
        if (len < sizeof(*ih) + sizeof(in))
            return 0;
        memcpy(&in, buf + sizeof(*ih), sizeof(in));
        if (in.size > outsize - sizeof(struct fuse_out_header))
            return 0;
        off = in.offset;
        size = in.size;
        data = out + sizeof(struct fuse_out_header);
    }
    pthread_mutex_lock(&r->lock);
    struct data_map *d = *data_slot(r, ih->nodeid);
    if (!d) {
        pthread_mutex_unlock(&r->lock);
        return 0;
    }
    d->uses++;
    pthread_mutex_unlock(&r->lock);

    int64_t n = cdm_region_serve(d->m, d->region, off, size, data, write, -1, ih->pid);
    if (n == -ENXIO)        /* a first touch: it needs the faulting CPU's node */
        n = cdm_region_serve(d->m, d->region, off, size, data, write,
                             cdm_machine_local_pool(d->m, (int32_t)ih->pid), ih->pid);

    pthread_mutex_lock(&r->lock);
    if (n >= 0) {
        uint64_t t = now_ns();
        if (write) {
            d->write_ns = t;
            r->stats.served_writes++;
        } else {
            d->read_ns = t;
            r->stats.served_reads++;
        }
        r->stats.requests++;
    }
    if (--d->uses == 0)
        pthread_cond_broadcast(&r->data_cond);
    pthread_mutex_unlock(&r->lock);
    if (n < 0)
        return 0;

    struct fuse_out_header *oh = (void *)out;
    oh->error = 0;
    oh->unique = ih->unique;
    if (write) {
        struct fuse_write_out wo = {(uint32_t)n, 0};
        oh->len = sizeof(*oh) + sizeof(wo);
        memcpy(out + sizeof(*oh), &wo, sizeof(wo));
    } else {
        oh->len = (uint32_t)(sizeof(*oh) + (uint64_t)n);
    }
    write_fuse(r, fd, out, oh->len);
    return 1;
}

int cdm_router_map_data(struct cdm_router *r, uint64_t nodeid, struct cdm_machine *m,
                        struct cdm_region *region)
{
    struct data_map *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->nodeid = nodeid;
    d->m = m;
    d->region = region;
    pthread_mutex_lock(&r->lock);
    struct data_map **p = data_slot(r, nodeid);
    if (*p) {
        pthread_mutex_unlock(&r->lock);
        free(d);
        return -EEXIST;
    }
    *p = d;
    pthread_mutex_unlock(&r->lock);
    return 0;
}

int cdm_router_unmap_data(struct cdm_router *r, uint64_t nodeid)
{
    pthread_mutex_lock(&r->lock);
    struct data_map **p = data_slot(r, nodeid), *d = *p;
    if (!d) {
        pthread_mutex_unlock(&r->lock);
        return -ENOENT;
    }
    *p = d->next;           /* no new use from now on */
    while (d->uses)
        pthread_cond_wait(&r->data_cond, &r->lock);
    pthread_mutex_unlock(&r->lock);
    free(d);
    return 0;
}

int cdm_router_data_times(struct cdm_router *r, uint64_t nodeid, uint64_t *read_ns,
                          uint64_t *write_ns)
{
    pthread_mutex_lock(&r->lock);
    struct data_map *d = *data_slot(r, nodeid);
    if (d) {
        *read_ns = d->read_ns;
        *write_ns = d->write_ns;
        d->read_ns = d->write_ns = 0;
    }
    pthread_mutex_unlock(&r->lock);
    return d ? 0 : -ENOENT;
}

static void deliver(struct cdm_router *r, unsigned char *buf, size_t n, int truncated);

/*
 * A reader: reads requests from its descriptor, serves what the core can and
 * forwards the rest.  Waking a sleeping thread costs more than a fault
 * served in C (DESIGN §5), so after a request the reader keeps reading for a
 * while (spinning) before it sleeps in poll().  The window adapts: it
 * doubles (up to spin_ns) when a spin finds a request and halves (down to
 * a sixteenth of it) when one ends empty, so that requests that come in
 * quick succession are met awake and a quiet mount costs little CPU.  The
 * window runs from the last request read or reply delivered (the requester
 * runs again then), and a spinning reader delivers Python's replies itself.
 */
static void *request_loop(void *arg)
{
    struct reader *rd = arg;
    struct cdm_router *r = rd->r;
    const int fd = rd->fd;
    const uint64_t spin_max = r->spin_ns, spin_min = r->spin_ns / 16;
    uint64_t window = spin_max, last = 0;
    int spinning = 0;
    size_t bufsize = DEFAULT_BUFSIZE;
    unsigned char *buf = malloc(bufsize);
    /* READ replies served here: max_pages is at most 256 (FUSE_MAX_MAX_PAGES). */
    unsigned char *out = malloc(DEFAULT_BUFSIZE);
    if (!buf || !out) {
        free(buf);
        free(out);
        pthread_mutex_lock(&r->lock);
        r->state |= CDM_ROUTER_FAILED;
        pthread_mutex_unlock(&r->lock);
        signal_python(r);
        return NULL;
    }
    for (;;) {
        pthread_mutex_lock(&r->lock);
        int stopping = r->stopping;
        uint64_t want = r->want_bufsize;
        pthread_mutex_unlock(&r->lock);
        if (stopping)
            break;
        if (want != bufsize) {
            /* INIT's reply has set max_write: the largest request is known. */
            unsigned char *resized = realloc(buf, want);
            if (resized) {
                buf = resized;
                bufsize = want;
            }
        }
        ssize_t n = read(fd, buf, bufsize);
        if (n < 0) {
            int err = errno;
            if (err == EAGAIN) {
                uint64_t since = __atomic_load_n(&r->last_reply_ns, __ATOMIC_RELAXED);
                if (since < last)
                    since = last;
                if (window && mono_ns() - since < window) {
                    /* Awake anyway: deliver Python's replies too, sparing
                     * the reply thread's wake-up. */
                    struct iovec iov = {out, DEFAULT_BUFSIZE};
                    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
                    ssize_t m = recvmsg(r->sock, &mh, MSG_DONTWAIT);
                    if (m > 0) {
                        __atomic_add_fetch(&r->stats.spin_replies, 1, __ATOMIC_RELAXED);
                        deliver(r, out, (size_t)m, mh.msg_flags & MSG_TRUNC);
                        if (window * 2 <= spin_max)
                            window *= 2;
                    }
                    spinning = 1;
                    continue;
                }
                if (spinning)
                    __atomic_add_fetch(&r->stats.spin_misses, 1, __ATOMIC_RELAXED);
                __atomic_add_fetch(&r->stats.sleeps, 1, __ATOMIC_RELAXED);
                if (spinning && window / 2 >= spin_min)
                    window /= 2;
                spinning = 0;
                struct pollfd p[2] = {{fd, POLLIN, 0}, {r->stop_fd, POLLIN, 0}};
                if (poll(p, 2, -1) < 0 && errno != EINTR)
                    break;
                continue;
            }
            if (err == EINTR || err == ENOENT)   /* ENOENT: interrupted in the kernel */
                continue;
            pthread_mutex_lock(&r->lock);
            if (err == ENODEV || err == ECONNABORTED)
                r->state |= CDM_ROUTER_UNMOUNTED;
            else
                r->state |= CDM_ROUTER_FAILED;
            r->stats.last_read_errno = err;
            pthread_mutex_unlock(&r->lock);
            signal_python(r);
            break;
        }
        if (spin_max) {
            if (spinning) {
                __atomic_add_fetch(&r->stats.spin_hits, 1, __ATOMIC_RELAXED);
                window = window * 2 < spin_max ? window * 2 : spin_max;
                spinning = 0;
            }
        }
        if ((size_t)n < sizeof(struct fuse_in_header))
            continue;
        uint32_t opcode = ((const struct fuse_in_header *)buf)->opcode;
        int k = attr_cache_handle(r->attrs, buf, (size_t)n, 0, out, DEFAULT_BUFSIZE);
        if (k > 0) {
            pthread_mutex_lock(&r->lock);
            r->stats.requests++;
            pthread_mutex_unlock(&r->lock);
            write_fuse(r, fd, out, (size_t)k);
        } else if (k == ATTR_FORWARD && (opcode == FUSE_READ || opcode == FUSE_WRITE) &&
                   serve_data(r, fd, buf, (size_t)n, out, DEFAULT_BUFSIZE)) {
            attr_cache_data_changed(r->attrs);   /* dirty, mapped, pgfault moved */
        } else {
            forward_request(r, fd, buf, (size_t)n, k == ATTR_SIDE);
        }
        if (spin_max)
            last = mono_ns();
    }
    free(buf);
    free(out);
    return NULL;
}

/* ------------------------------------------------------------ Python's side */

static void record_init_reply(struct cdm_router *r, unsigned char *msg, size_t len)
{
    const struct fuse_out_header *oh = (const void *)msg;
    struct fuse_init_out out = {0};
    size_t n = len - sizeof(*oh);
    memcpy(&out, msg + sizeof(*oh), n < sizeof(out) ? n : sizeof(out));
    if (oh->error == 0 && n >= offsetof(struct fuse_init_out, flags) + sizeof(out.flags) &&
        (out.flags & FUSE_AUTO_INVAL_DATA)) {
        /* See the header: the page cache is the CPU's page table. */
        out.flags &= ~FUSE_AUTO_INVAL_DATA;
        memcpy(msg + sizeof(*oh) + offsetof(struct fuse_init_out, flags), &out.flags,
               sizeof(out.flags));
    }
    pthread_mutex_lock(&r->lock);
    r->init.error = oh->error;
    r->init.done = 1;
    if (oh->error == 0) {
        r->init.major = out.major;
        r->init.minor = out.minor;
        r->init.max_readahead = out.max_readahead;
        r->init.flags = out.flags;
        r->init.flags2 = out.flags2;
        r->init.max_background = out.max_background;
        r->init.congestion_threshold = out.congestion_threshold;
        r->init.max_write = out.max_write;
        r->init.time_gran = out.time_gran;
        r->init.max_pages = out.max_pages;
        /* As libfuse sizes its own buffer: max_write plus the headers. */
        uint64_t want = (uint64_t)out.max_write + HEADER_ROOM;
        r->want_bufsize = want > FUSE_MIN_READ_BUFFER ? want : FUSE_MIN_READ_BUFFER;
    }
    pthread_mutex_unlock(&r->lock);
}

static void queue_note(struct cdm_router *r, const unsigned char *msg, size_t len)
{
    struct note *nt = malloc(sizeof(*nt) + len);
    if (!nt)
        return;   /* a notification is advice: dropping it under no memory is safe */
    nt->next = NULL;
    nt->len = len;
    memcpy(nt->msg, msg, len);
    pthread_mutex_lock(&r->lock);
    *r->notes_tail = nt;
    r->notes_tail = &nt->next;
    r->stats.notifications++;
    pthread_cond_signal(&r->notes_cond);
    pthread_mutex_unlock(&r->lock);
}

/* A message of Python's side (n bytes in buf, truncated if longer than it):
 * a reply goes to the descriptor its request came from, a notification to
 * the notifier.  From the reply thread, or a reader that found it while
 * spinning. */
static void deliver(struct cdm_router *r, unsigned char *buf, size_t n, int truncated)
{
    if (n < sizeof(struct fuse_out_header))
        return;
    const struct fuse_out_header *oh = (const void *)buf;
    uint64_t unique = oh->unique;
    if (unique == 0) {
        if (!truncated)
            queue_note(r, buf, n);
        return;
    }
    if (unique & FUSE_INT_REQ_BIT) {
        /* An INTERRUPT's answer (EAGAIN, ENOSYS): for the kernel's
         * queue of the request it interrupts; one descriptor so far. */
        write_fuse(r, r->fuse_fd, buf, n);
        return;
    }
    struct entry e = {.fd = r->fuse_fd};
    pthread_mutex_lock(&r->lock);
    int known = table_remove(r, unique, &e);
    r->stats.replies++;
    pthread_mutex_unlock(&r->lock);
    if (truncated) {
        /* A reply longer than any request allows: the kernel would refuse it. */
        reply_error(r, e.fd, unique, EIO);
        return;
    }
    if (known && e.opcode == FUSE_INIT)
        record_init_reply(r, buf, n);
    write_fuse(r, e.fd, buf, n);
    /* The requester runs again: its next request may follow at once. */
    __atomic_store_n(&r->last_reply_ns, mono_ns(), __ATOMIC_RELAXED);
}

static void *reply_loop(void *arg)
{
    struct cdm_router *r = arg;
    size_t bufsize = DEFAULT_BUFSIZE;
    unsigned char *buf = malloc(bufsize);
    while (buf) {
        struct iovec iov = {buf, bufsize};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
        ssize_t n = recvmsg(r->sock, &mh, 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0)
            break;   /* the end of Python's side, or stopping */
        deliver(r, buf, (size_t)n, mh.msg_flags & MSG_TRUNC);
    }
    free(buf);
    python_gone(r);
    return NULL;
}

static void *notify_loop(void *arg)
{
    struct cdm_router *r = arg;
    pthread_mutex_lock(&r->lock);
    for (;;) {
        while (!r->notes && !r->stopping)
            pthread_cond_wait(&r->notes_cond, &r->lock);
        struct note *nt = r->notes;
        if (!nt)
            break;   /* stopping, and nothing left */
        r->notes = nt->next;
        if (!r->notes)
            r->notes_tail = &r->notes;
        pthread_mutex_unlock(&r->lock);
        write_fuse(r, r->fuse_fd, nt->msg, nt->len);
        free(nt);
        pthread_mutex_lock(&r->lock);
    }
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

/* ------------------------------------------------------------ entry points */

struct cdm_router *cdm_router_new(void)
{
    struct cdm_router *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->fuse_fd = r->sock = r->python_fd = r->event_fd = r->stop_fd = -1;
    r->side_sock = r->side_python_fd = -1;
    r->notes_tail = &r->notes;
    r->want_bufsize = DEFAULT_BUFSIZE;
    r->nreaders = 1;
    for (int k = 0; k < CDM_ROUTER_MAX_READERS; k++)
        r->readers[k].fd = -1;
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->notes_cond, NULL);
    pthread_cond_init(&r->data_cond, NULL);
    r->attrs = attr_cache_new();
    if (!r->attrs) {
        cdm_router_free(r);
        return NULL;
    }
    return r;
}

static int set_buffers(int fd)
{
    int size = SOCKET_BUFFER;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0) {
        /* Without CAP_NET_ADMIN: as much as net.core.wmem_max allows. */
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    }
    int got = 0;
    socklen_t len = sizeof(got);
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &len) < 0)
        return -errno;
    /* A message must be smaller than the sender's buffer. */
    return got >= 2 * DEFAULT_BUFSIZE ? 0 : -ENOBUFS;
}

/* Closes the router's descriptors and marks them closed; python_fd too
 * unless libfuse owns it (handed over by a mount that succeeded). */
static void close_fds(struct cdm_router *r, int with_python_fd)
{
    int *fds[] = {&r->fuse_fd, &r->sock, &r->event_fd, &r->stop_fd, &r->side_sock,
                  &r->side_python_fd, with_python_fd ? &r->python_fd : NULL};
    for (size_t k = 0; k < sizeof(fds) / sizeof(fds[0]); k++) {
        if (fds[k] && *fds[k] >= 0) {
            close(*fds[k]);
            *fds[k] = -1;
        }
    }
}

int cdm_router_mount(struct cdm_router *r, const char *mountpoint, const char *fsname,
                     const char *subtype, const char *options)
{
    if (r->fuse_fd >= 0)
        return -EBUSY;
    int sv[2] = {-1, -1}, err;
    r->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    r->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->event_fd < 0 || r->stop_fd < 0)
        goto fail_errno;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        goto fail_errno;
    r->sock = sv[0];
    r->python_fd = sv[1];
    if ((err = set_buffers(sv[0])) < 0 || (err = set_buffers(sv[1])) < 0)
        goto fail;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        goto fail_errno;
    r->side_sock = sv[0];
    r->side_python_fd = sv[1];
    if ((err = set_buffers(sv[0])) < 0 || (err = set_buffers(sv[1])) < 0)
        goto fail;
    r->fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (r->fuse_fd < 0)
        goto fail_errno;

    /* As libfuse's mount.c does it: the source is fsname, the type
     * fuse.SUBTYPE, nosuid and nodev, and the kernel's own options. */
    struct stat st;
    if (stat(mountpoint, &st) < 0)
        goto fail_errno;
    char data[1024], type[128];
    int len = snprintf(data, sizeof(data), "fd=%d,rootmode=%o,user_id=%u,group_id=%u%s%s",
                       r->fuse_fd, st.st_mode & S_IFMT, getuid(), getgid(),
                       options && *options ? "," : "", options ? options : "");
    if (len < 0 || (size_t)len >= sizeof(data))
        { err = -EINVAL; goto fail; }
    len = snprintf(type, sizeof(type), subtype && *subtype ? "fuse.%s" : "fuse",
                   subtype ? subtype : "");
    if (len < 0 || (size_t)len >= sizeof(type))
        { err = -EINVAL; goto fail; }
    if (mount(fsname && *fsname ? fsname : "fuse", mountpoint, type, MS_NOSUID | MS_NODEV, data) < 0)
        goto fail_errno;
    r->mounted = 1;
    return 0;

fail_errno:
    err = -errno;
fail:
    close_fds(r, 1);
    return err;
}

int cdm_router_tune(struct cdm_router *r, uint32_t readers, uint32_t spin_us)
{
    if (r->started)
        return -EBUSY;
    if (readers < 1 || readers > CDM_ROUTER_MAX_READERS || spin_us > CDM_ROUTER_MAX_SPIN_US)
        return -EINVAL;
    r->nreaders = readers;
    r->spin_ns = (uint64_t)spin_us * 1000;
    return 0;
}

/* Joins the first n readers. */
static void join_readers(struct cdm_router *r, uint32_t n)
{
    for (uint32_t k = 0; k < n; k++)
        pthread_join(r->readers[k].thread, NULL);
}

int cdm_router_start(struct cdm_router *r)
{
    if (!r->mounted || r->started)
        return -EINVAL;
    /* Readers after the first read a clone of the descriptor: the kernel
     * hands each request to one of them. */
    for (uint32_t k = 0; k < r->nreaders; k++) {
        struct reader *rd = &r->readers[k];
        rd->r = r;
        if (k == 0 || rd->fd >= 0)
            continue;
        int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
            return -errno;
        uint32_t master = (uint32_t)r->fuse_fd;
        if (ioctl(fd, FUSE_DEV_IOC_CLONE, &master) < 0) {
            int err = -errno;
            close(fd);
            return err;
        }
        rd->fd = fd;
    }
    r->readers[0].fd = r->fuse_fd;
    /* Signals are for Python's thread: the router's threads block them all. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    uint32_t started = 0;
    int err = attr_cache_start(r->attrs, r->fuse_fd);
    err = err < 0 ? -err : pthread_create(&r->notify_thread, NULL, notify_loop, r);
    if (!err) {
        int replying = !(err = pthread_create(&r->reply_thread, NULL, reply_loop, r));
        for (; !err && started < r->nreaders; started++)
            err = pthread_create(&r->readers[started].thread, NULL, request_loop, &r->readers[started]);
        if (err) {
            pthread_mutex_lock(&r->lock);
            r->stopping = 1;
            pthread_cond_signal(&r->notes_cond);
            pthread_mutex_unlock(&r->lock);
            uint64_t one = 1;
            ssize_t n = write(r->stop_fd, &one, sizeof(one));
            (void)n;
            shutdown(r->sock, SHUT_RDWR);
            join_readers(r, started);
            if (replying)
                pthread_join(r->reply_thread, NULL);
            pthread_join(r->notify_thread, NULL);
        }
    }
    if (err)
        attr_cache_stop(r->attrs);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err)
        return -err;
    for (uint32_t k = 0; k < r->nreaders; k++)
        pthread_setname_np(r->readers[k].thread, "cdmfs-router");
    pthread_setname_np(r->reply_thread, "cdmfs-reply");
    pthread_setname_np(r->notify_thread, "cdmfs-notify");
    r->started = 1;
    pthread_mutex_lock(&r->lock);
    r->state |= CDM_ROUTER_RUNNING;
    pthread_mutex_unlock(&r->lock);
    return 0;
}

int cdm_router_fuse_fd(struct cdm_router *r) { return r->fuse_fd; }
int cdm_router_python_fd(struct cdm_router *r) { return r->python_fd; }
int cdm_router_event_fd(struct cdm_router *r) { return r->event_fd; }
int cdm_router_side_fd(struct cdm_router *r) { return r->side_python_fd; }

int cdm_router_route(struct cdm_router *r, uint32_t opcode, int on)
{
    if (opcode >= 64 || opcode == FUSE_INIT || no_reply(opcode))
        return -EINVAL;
    pthread_mutex_lock(&r->lock);
    if (on)
        r->side_mask |= 1ULL << opcode;
    else
        r->side_mask &= ~(1ULL << opcode);
    pthread_mutex_unlock(&r->lock);
    return 0;
}

int cdm_router_reply(struct cdm_router *r, uint64_t unique, int32_t error,
                     const void *data, size_t len)
{
    if (error < 0 || error > 4095 || (error && len))
        return -EINVAL;
    struct entry e;
    pthread_mutex_lock(&r->lock);
    int known = table_remove(r, unique, &e);
    if (known)
        r->stats.replies++;
    pthread_mutex_unlock(&r->lock);
    if (!known)
        return -ENOENT;     /* failed already (Python gone), or never ours */
    struct fuse_out_header oh = {(uint32_t)(sizeof(oh) + len), -error, unique};
    struct iovec iov[2] = {{&oh, sizeof(oh)}, {(void *)data, len}};
    ssize_t n;
    do
        n = writev(e.fd, iov, len ? 2 : 1);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        int err = errno;
        pthread_mutex_lock(&r->lock);
        r->stats.write_errors++;
        r->stats.last_write_errno = err;
        pthread_mutex_unlock(&r->lock);
        return -err;
    }
    return 0;
}

struct cdm_attr_cache *cdm_router_attrs(struct cdm_router *r) { return r->attrs; }

int cdm_router_attr_answer(struct cdm_router *r, const void *req, size_t len)
{
    if (len < sizeof(struct fuse_in_header))
        return -EINVAL;
    /* Attribute bytes are at most a page (attr_cache.c). */
    unsigned char out[sizeof(struct fuse_out_header) + sizeof(struct fuse_open_out) + CDM_PAGE_SIZE];
    int k = attr_cache_handle(r->attrs, req, len, 1, out, sizeof(out));
    if (k <= 0)
        return -EAGAIN;
    struct entry e;
    pthread_mutex_lock(&r->lock);
    int known = table_remove(r, ((const struct fuse_in_header *)req)->unique, &e);
    if (known)
        r->stats.replies++;
    pthread_mutex_unlock(&r->lock);
    if (!known)
        return -ENOENT;
    write_fuse(r, e.fd, out, (size_t)k);
    return 0;
}

int cdm_router_state(struct cdm_router *r)
{
    pthread_mutex_lock(&r->lock);
    int s = r->state;
    pthread_mutex_unlock(&r->lock);
    return s;
}

void cdm_router_init_params(struct cdm_router *r, struct cdm_router_init *out)
{
    pthread_mutex_lock(&r->lock);
    *out = r->init;
    pthread_mutex_unlock(&r->lock);
}

void cdm_router_stats(struct cdm_router *r, struct cdm_router_stats *out)
{
    pthread_mutex_lock(&r->lock);
    *out = r->stats;
    out->outstanding = r->table_used;
    pthread_mutex_unlock(&r->lock);
}

void cdm_router_stop(struct cdm_router *r)
{
    if (!r->started)
        return;
    pthread_mutex_lock(&r->lock);
    r->stopping = 1;
    pthread_mutex_unlock(&r->lock);
    uint64_t one = 1;
    ssize_t n = write(r->stop_fd, &one, sizeof(one));
    (void)n;
    /* Wakes the reply thread (end of socket) and a request thread blocked
     * sending to a Python side that no longer reads. */
    shutdown(r->sock, SHUT_RDWR);
    if (r->side_sock >= 0)
        shutdown(r->side_sock, SHUT_RDWR);   /* Python's side-channel reader sees its end */
    join_readers(r, r->nreaders);
    pthread_join(r->reply_thread, NULL);
    pthread_mutex_lock(&r->lock);
    pthread_cond_signal(&r->notes_cond);
    pthread_mutex_unlock(&r->lock);
    pthread_join(r->notify_thread, NULL);
    attr_cache_stop(r->attrs);
    r->started = 0;
    pthread_mutex_lock(&r->lock);
    r->state &= ~CDM_ROUTER_RUNNING;
    pthread_mutex_unlock(&r->lock);
}

void cdm_router_free(struct cdm_router *r)
{
    if (!r)
        return;
    cdm_router_stop(r);
    /* python_fd belongs to libfuse once handed over: not closed here. */
    close_fds(r, 0);
    for (uint32_t k = 1; k < CDM_ROUTER_MAX_READERS; k++)
        if (r->readers[k].fd >= 0)
            close(r->readers[k].fd);
    while (r->notes) {
        struct note *nt = r->notes;
        r->notes = nt->next;
        free(nt);
    }
    free(r->table);
    for (int i = 0; i < DATA_BUCKETS; i++) {
        while (r->data[i]) {
            struct data_map *d = r->data[i];
            r->data[i] = d->next;
            free(d);
        }
    }
    attr_cache_free(r->attrs);
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->notes_cond);
    pthread_cond_destroy(&r->data_cond);
    free(r);
}
