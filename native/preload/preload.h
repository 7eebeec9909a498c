/* The interposer of `cdmfs run` (libcdmfs_run.so, loaded with LD_PRELOAD):
 * what its parts share.
 *
 *   region.c     the process's region: anonymous mmap/munmap/mremap/madvise
 *                become mappings of MOUNT/regions/PID/data; exec and fork
 *   mempolicy.c  set_mempolicy, get_mempolicy, mbind, move_pages,
 *                migrate_pages, set_mempolicy_home_node and syscall(2)
 *   sysfs.c      libnuma's and hwloc's reads of /sys/devices/system/{node,cpu}
 *                and of Mems_allowed in /proc/self/status, into the mount
 *
 * Allocators call mmap before any constructor has run, so nothing here
 * allocates with malloc or calls a libc function that might map memory on
 * the paths an allocator reaches: system calls are raw, buffers are static
 * or on the stack, and setup is lazy.
 */
#ifndef CDMFS_PRELOAD_H
#define CDMFS_PRELOAD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define PAGE 4096UL
#define MAX_NODES 1024                    /* bits of a nodemask we accept */
#define MASK_WORDS (MAX_NODES / 64)

/* Raw system calls: -errno on failure, never errno. */
long cdm_raw(long nr, long a, long b, long c, long d, long e, long f);
#define RAW0(n) cdm_raw(n, 0, 0, 0, 0, 0, 0)
#define RAW1(n, a) cdm_raw(n, (long)(a), 0, 0, 0, 0, 0)
#define RAW2(n, a, b) cdm_raw(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define RAW3(n, a, b, c) cdm_raw(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define RAW4(n, a, b, c, d) cdm_raw(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define RAW6(n, a, b, c, d, e, f) cdm_raw(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))
long cdm_ret(long r);                     /* -errno -> errno and -1 */

/* Small string helpers that never allocate. */
size_t cdm_strlcpy(char *dst, const char *src, size_t size);
size_t cdm_strlcat(char *dst, const char *src, size_t size);
char *cdm_utoa(char *buf, unsigned long v);               /* returns buf */
int cdm_read_file(const char *path, char *buf, size_t size);   /* bytes or -errno, NUL ended */
int cdm_write_fd(int fd, const char *text);               /* pwrite at 0: 0 or -errno */

/* A line of /proc/self/maps: the mapping [start, end), its PROT_* bits, the
 * file offset and path ("" for none). */
struct cdm_mapping {
    uintptr_t start, end;
    int prot;
    unsigned long offset;
    const char *path;
};
/* Calls fn for each mapping of the process, in address order, until fn
 * returns non-zero (then returns that); buf (a caller's static buffer of
 * size bytes) holds the lines as they are read.  0, or -errno when the
 * file cannot be opened. */
int cdm_for_each_mapping(char *buf, size_t size,
                         int (*fn)(const struct cdm_mapping *, void *), void *arg);

/* A nodemask. */
struct nodemask { uint64_t w[MASK_WORDS]; };
int nm_isset(const struct nodemask *m, int n);
void nm_set(struct nodemask *m, int n);
int nm_empty(const struct nodemask *m);
int nm_weight(const struct nodemask *m);
int nm_first(const struct nodemask *m);
int nm_next(const struct nodemask *m, int n);             /* next set after n, or -1 */
int nm_parse(const char *list, struct nodemask *m);       /* "0-1,3": 0 or -EINVAL */
char *nm_format(const struct nodemask *m, char *buf, size_t size);

/* A memory policy as the kernel keeps one. */
struct mpol {
    int mode;                 /* MPOL_DEFAULT... */
    unsigned flags;           /* MPOL_F_STATIC_NODES... */
    struct nodemask nodes;    /* the nodes after masking with mems_allowed */
    struct nodemask user;     /* as given, for MPOL_F_STATIC/RELATIVE_NODES */
    int home;                 /* set_mempolicy_home_node, -1 */
};
int mpol_region_str(const struct mpol *p, char *buf, size_t size);  /* "bind:1" */
int mpol_env_parse(const char *text, struct mpol *p);
void mpol_env_format(const struct mpol *p, char *buf, size_t size);

/* region.c */
struct cdm_state {
    int ready;                      /* 1: the region is set up; -1: disabled */
    char mount[1024];               /* the cdmfs mount */
    char dir[1200];                 /* MOUNT/regions/PID */
    char data_path[1300];
    int pid;
    int fd_data, fd_mbind, fd_migrate, fd_advise, fd_policy;
    unsigned long min_size;
    int fault_around;               /* let faults read around (inexact placement) */
};
extern struct cdm_state cdm;
int cdm_setup(void);                          /* lazily: 0, or -1 when disabled */
void cdm_lock(void);
void cdm_unlock(void);
/* The region offset of addr (page aligned), or -1 if addr is not in the region. */
long cdm_offset_of(uintptr_t addr, uintptr_t *extent_end);
/* Pieces of [start, end) inside the region: fn(addr, len, off) for each. */
int cdm_for_each_piece(uintptr_t start, uintptr_t end,
                       int (*fn)(uintptr_t addr, size_t len, uint64_t off, void *arg), void *arg);
uint64_t cdm_region_used(void);               /* offsets in use are below this */
/* Under cdm_lock: the region offset of addr, the piece ending at *piece_end
 * (the end of its extent, or end); or -1, *piece_end then the start of the
 * next extent (or end): host memory up to there. */
long cdm_piece_at(uintptr_t addr, uintptr_t end, uintptr_t *piece_end);
long cdm_bounce_alloc(uint64_t len);          /* under cdm_lock: offsets no mapping uses, or -errno */
void cdm_bounce_free(uint64_t off, uint64_t len);   /* under cdm_lock: given up, their pages freed */
extern __thread int cdm_in_lib __attribute__((tls_model("initial-exec")));

/* mempolicy.c */
void cdm_mempolicy_init(void);                /* the task policy from the environment */
int cdm_mems_allowed(struct nodemask *m);     /* has_memory of the mount */
int cdm_nr_node_ids(void);
long cdm_set_mempolicy(int mode, const unsigned long *nmask, unsigned long maxnode);
long cdm_get_mempolicy(int *mode, unsigned long *nmask, unsigned long maxnode, void *addr, unsigned long flags);
long cdm_mbind(void *start, unsigned long len, int mode, const unsigned long *nmask,
               unsigned long maxnode, unsigned flags);
long cdm_move_pages(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags);
long cdm_migrate_pages(int pid, unsigned long maxnode, const unsigned long *old_nodes,
                       const unsigned long *new_nodes);
long cdm_set_mempolicy_home_node(unsigned long start, unsigned long len, unsigned long home, unsigned long flags);
void cdm_policy_for_mmap(uintptr_t addr, size_t len, uint64_t off);  /* a thread's own policy */

/* dmirror.c: /dev/hmm_dmirrorN, the kernel's HMM test device, emulated */
int cdm_dmirror_open(const char *path, int flags);    /* fd, -errno, or -ENOSYS: not ours */
int cdm_dmirror_is(int fd);
void cdm_dmirror_close(int fd);
long cdm_dmirror_ioctl(int fd, unsigned long req, void *arg);  /* 0 or -errno */
void cdm_dmirror_thp_advice(uintptr_t start, uintptr_t end, int on);
void *cdm_dmirror_mmap(void *addr, size_t len, int prot, int flags);   /* mmap of a dmirror fd */
void cdm_dmirror_unmap(uintptr_t start, uintptr_t end);               /* under cdm_lock */

/* sysfs.c */
const char *cdm_redirect(const char *path, char *buf, size_t size);   /* path, or buf rewritten */
int cdm_status_fd(const char *path);          /* a rewritten /proc/self/status, or -1 */

#endif
