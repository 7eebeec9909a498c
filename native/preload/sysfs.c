/* What libnuma and hwloc read, resolved into the mount: paths under
 * /sys/devices/system/node, /sys/devices/system/cpu and /sys/bus/node open
 * MOUNT/sys/...; /proc/self/status reads with Mems_allowed and
 * Mems_allowed_list rewritten to the emulated nodes with memory, at the
 * host's width (libnuma sizes its nodemasks by it).  glibc opens files
 * internally without the PLT, so fopen and opendir are interposed too.
 *
 * exec: the new image must run under the interposer too, with the task
 * policy the kernel would keep; execve and execvpe put LD_PRELOAD and the
 * CDMFS_RUN_* variables back into an environment that lost them.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "preload.h"

static const char *const redirected[] = {
    "/sys/devices/system/node", "/sys/devices/system/cpu", "/sys/bus/node",
};

static const char *mount_path(void)
{
    const char *m = getenv("CDMFS_RUN_MOUNT");
    return m && *m ? m : NULL;
}

/* hwloc opens "/" and reads relative to it: openat(rootfd, "sys/..."). */
static const char *redirect_at(int dirfd, const char *path, char *buf, size_t size)
{
    const char *mnt;
    if (!path || path[0] == '/' || dirfd == AT_FDCWD || strncmp(path, "sys/", 4) || !(mnt = mount_path()))
        return NULL;
    char abs[4096] = "/";
    cdm_strlcat(abs, path, sizeof abs);
    const char *r = cdm_redirect(abs, buf, size);
    if (r == abs)
        return NULL;
    struct stat dir, root;
    if (RAW4(SYS_newfstatat, dirfd, "", &dir, AT_EMPTY_PATH) || RAW4(SYS_newfstatat, AT_FDCWD, "/", &root, 0) ||
        dir.st_dev != root.st_dev || dir.st_ino != root.st_ino)
        return NULL;
    return buf;
}

const char *cdm_redirect(const char *path, char *buf, size_t size)
{
    const char *mnt;
    if (!path || path[0] != '/' || path[1] != 's' || !(mnt = mount_path()))
        return path;
    for (size_t i = 0; i < sizeof redirected / sizeof *redirected; i++) {
        size_t n = strlen(redirected[i]);
        if (!strncmp(path, redirected[i], n) && (path[n] == 0 || path[n] == '/')) {
            cdm_strlcpy(buf, mnt, size);
            cdm_strlcat(buf, path, size);
            return buf;
        }
    }
    return path;
}

static int is_status(const char *path)
{
    char num[24], own[48];
    if (!path || strncmp(path, "/proc/", 6) || !mount_path())
        return 0;
    if (!strcmp(path, "/proc/self/status") || !strcmp(path, "/proc/thread-self/status"))
        return 1;
    cdm_strlcpy(own, "/proc/", sizeof own);
    cdm_strlcat(own, cdm_utoa(num, (unsigned long)RAW0(SYS_getpid)), sizeof own);
    cdm_strlcat(own, "/status", sizeof own);
    return !strcmp(path, own);
}

/* A cgroup's cpuset.mems (v1) or cpuset.mems.effective (v2): hwloc takes
 * the allowed nodes from it. */
static int is_cpuset_mems(const char *path)
{
    if (!path || strncmp(path, "/sys/fs/cgroup/", 15) || !mount_path())
        return 0;
    size_t n = strlen(path);
    static const char v1[] = "/cpuset.mems", v2[] = "/cpuset.mems.effective";
    return (n >= sizeof v1 - 1 && !strcmp(path + n - (sizeof v1 - 1), v1)) ||
           (n >= sizeof v2 - 1 && !strcmp(path + n - (sizeof v2 - 1), v2));
}

static int memfd_with(const char *text)
{
    long fd = RAW2(SYS_memfd_create, "cdmfs", MFD_CLOEXEC);
    if (fd < 0)
        return (int)fd;
    RAW3(SYS_write, fd, text, strlen(text));
    RAW3(SYS_lseek, fd, 0, SEEK_SET);
    return (int)fd;
}

static int cpuset_mems_fd(void)
{
    char hm[1400], list[4096];
    cdm_strlcpy(hm, mount_path(), sizeof hm);
    cdm_strlcat(hm, "/sys/devices/system/node/has_memory", sizeof hm);
    if (cdm_read_file(hm, list, sizeof list) < 0)
        return -EIO;
    return memfd_with(list);
}

/* The fd that stands for a file whose contents are rewritten, or -1. */
static int rewritten_fd(const char *path)
{
    if (is_status(path))
        return cdm_status_fd(path);
    if (is_cpuset_mems(path))
        return cpuset_mems_fd();
    return -1;
}

/* A memfd holding /proc/self/status with the emulated Mems_allowed. */
int cdm_status_fd(const char *path)
{
    static char in[16384], out[16384];
    char hm[1400], list[4096];
    int n = cdm_read_file(path, in, sizeof in);
    if (n < 0)
        return n;
    struct nodemask mems;
    cdm_strlcpy(hm, mount_path(), sizeof hm);
    cdm_strlcat(hm, "/sys/devices/system/node/has_memory", sizeof hm);
    if (cdm_read_file(hm, list, sizeof list) < 0 || nm_parse(list, &mems))
        return -EIO;
    out[0] = 0;
    for (char *line = in; *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        if (!strncmp(line, "Mems_allowed:\t", 14)) {
            /* The same groups of 8 hex digits, most significant first. */
            char *p = line + 14;
            int groups = 1;
            for (char *q = p; *q; q++)
                groups += *q == ',';
            cdm_strlcat(out, "Mems_allowed:\t", sizeof out);
            for (int g = groups - 1; g >= 0; g--) {
                unsigned v = 0;
                for (int b = 0; b < 32; b++)
                    if (nm_isset(&mems, g * 32 + b))
                        v |= 1u << b;
                char hex[10];
                for (int k = 7; k >= 0; k--, v >>= 4)
                    hex[k] = "0123456789abcdef"[v & 15];
                hex[8] = g ? ',' : 0;
                hex[9] = 0;
                cdm_strlcat(out, hex, sizeof out);
            }
        } else if (!strncmp(line, "Mems_allowed_list:\t", 19)) {
            cdm_strlcat(out, "Mems_allowed_list:\t", sizeof out);
            cdm_strlcat(out, nm_format(&mems, list, sizeof list), sizeof out);
        } else {
            cdm_strlcat(out, line, sizeof out);
        }
        cdm_strlcat(out, "\n", sizeof out);
        if (!nl)
            break;
        line = nl + 1;
    }
    return memfd_with(out);
}

/* ------------------------------------------------------------ open and friends */

static int open_impl(int dirfd, const char *path, int flags, mode_t mode)
{
    char buf[4096];
    if (path && !strncmp(path, "/dev/hmm_dmirror", 16)) {
        int fd = cdm_dmirror_open(path, flags);
        if (fd != -ENOSYS)
            return (int)cdm_ret(fd);
    }
    if ((flags & O_ACCMODE) == O_RDONLY) {
        int fd = rewritten_fd(path);
        if (fd >= 0 && !(flags & O_CLOEXEC))
            RAW3(SYS_fcntl, fd, F_SETFD, 0);
        if (fd >= 0)
            return fd;
    }
    const char *at = redirect_at(dirfd, path, buf, sizeof buf);
    if (at)
        return (int)cdm_ret(RAW4(SYS_openat, AT_FDCWD, at, flags, mode));
    return (int)cdm_ret(RAW4(SYS_openat, dirfd, cdm_redirect(path, buf, sizeof buf), flags, mode));
}

#define MODE_ARG(flags)                                                      \
    mode_t mode = 0;                                                         \
    if ((flags) & (O_CREAT | __O_TMPFILE)) {                                 \
        va_list ap;                                                          \
        va_start(ap, flags);                                                 \
        mode = va_arg(ap, mode_t);                                           \
        va_end(ap);                                                          \
    }

int open(const char *path, int flags, ...) { MODE_ARG(flags); return open_impl(AT_FDCWD, path, flags, mode); }
int open64(const char *path, int flags, ...) { MODE_ARG(flags); return open_impl(AT_FDCWD, path, flags, mode); }
int openat(int d, const char *path, int flags, ...) { MODE_ARG(flags); return open_impl(d, path, flags, mode); }
int openat64(int d, const char *path, int flags, ...) { MODE_ARG(flags); return open_impl(d, path, flags, mode); }
int __open_2(const char *path, int flags) { return open_impl(AT_FDCWD, path, flags, 0); }
int __open64_2(const char *path, int flags) { return open_impl(AT_FDCWD, path, flags, 0); }
int __openat_2(int d, const char *path, int flags) { return open_impl(d, path, flags, 0); }
int __openat64_2(int d, const char *path, int flags) { return open_impl(d, path, flags, 0); }

static FILE *fopen_impl(const char *path, const char *mode, const char *sym)
{
    static FILE *(*real)(const char *, const char *);
    if (!real)
        real = (FILE * (*)(const char *, const char *)) dlsym(RTLD_NEXT, sym);
    if (mode[0] == 'r' && mode[1] != '+') {
        int fd = rewritten_fd(path);
        if (fd >= 0) {
            RAW3(SYS_fcntl, fd, F_SETFD, strchr(mode, 'e') ? FD_CLOEXEC : 0);
            FILE *f = fdopen(fd, mode);
            if (f)
                return f;
            RAW1(SYS_close, fd);
        }
    }
    char buf[4096];
    return real(cdm_redirect(path, buf, sizeof buf), mode);
}

FILE *fopen(const char *path, const char *mode) { return fopen_impl(path, mode, "fopen"); }
FILE *fopen64(const char *path, const char *mode) { return fopen_impl(path, mode, "fopen64"); }

DIR *opendir(const char *path)
{
    static DIR *(*real)(const char *);
    if (!real)
        real = (DIR * (*)(const char *)) dlsym(RTLD_NEXT, "opendir");
    char buf[4096];
    return real(cdm_redirect(path, buf, sizeof buf));
}

int scandir(const char *path, struct dirent ***list, int (*sel)(const struct dirent *),
            int (*cmp)(const struct dirent **, const struct dirent **))
{
    static int (*real)(const char *, struct dirent ***, int (*)(const struct dirent *),
                       int (*)(const struct dirent **, const struct dirent **));
    if (!real)
        real = dlsym(RTLD_NEXT, "scandir");
    char buf[4096];
    return real(cdm_redirect(path, buf, sizeof buf), list, sel, cmp);
}

#define RDR(p) cdm_redirect(p, buf, sizeof buf)
/* A path relative to dirfd, or made absolute into the mount (dirfd then unused). */
#define RDR_AT(d, p) (redirect_at(d, p, buf, sizeof buf) ? (d = AT_FDCWD, buf) : cdm_redirect(p, buf, sizeof buf))

int stat(const char *p, struct stat *st) { char buf[4096]; return (int)cdm_ret(RAW4(SYS_newfstatat, AT_FDCWD, RDR(p), st, 0)); }
int stat64(const char *p, struct stat64 *st) { char buf[4096]; return (int)cdm_ret(RAW4(SYS_newfstatat, AT_FDCWD, RDR(p), st, 0)); }
int lstat(const char *p, struct stat *st) { char buf[4096]; return (int)cdm_ret(RAW4(SYS_newfstatat, AT_FDCWD, RDR(p), st, AT_SYMLINK_NOFOLLOW)); }
int lstat64(const char *p, struct stat64 *st) { char buf[4096]; return (int)cdm_ret(RAW4(SYS_newfstatat, AT_FDCWD, RDR(p), st, AT_SYMLINK_NOFOLLOW)); }
int fstatat(int d, const char *p, struct stat *st, int fl) { char buf[4096]; const char *q = RDR_AT(d, p); return (int)cdm_ret(RAW4(SYS_newfstatat, d, q, st, fl)); }
int fstatat64(int d, const char *p, struct stat64 *st, int fl) { char buf[4096]; const char *q = RDR_AT(d, p); return (int)cdm_ret(RAW4(SYS_newfstatat, d, q, st, fl)); }
int access(const char *p, int m) { char buf[4096]; return (int)cdm_ret(RAW3(SYS_faccessat, AT_FDCWD, RDR(p), m)); }
int faccessat(int d, const char *p, int m, int fl)
{
    char buf[4096];
    const char *q = RDR_AT(d, p);
    return (int)cdm_ret(RAW4(SYS_faccessat2, d, q, m, fl));
}
ssize_t readlink(const char *p, char *out, size_t n) { char buf[4096]; return cdm_ret(RAW4(SYS_readlinkat, AT_FDCWD, RDR(p), out, n)); }
ssize_t readlinkat(int d, const char *p, char *out, size_t n) { char buf[4096]; const char *q = RDR_AT(d, p); return cdm_ret(RAW4(SYS_readlinkat, d, q, out, n)); }

/* ------------------------------------------------------------ exec */

extern char **environ;
extern void mpol_current_env(char *buf, size_t size);

static const char *const carried[] = {"LD_PRELOAD", "CDMFS_RUN_MOUNT", "CDMFS_RUN_MIN_SIZE",
                                      "CDMFS_RUN_FAULT_AROUND"};
#define NCARRIED (int)(sizeof carried / sizeof *carried)
static char saved[NCARRIED][4096];

__attribute__((constructor)) static void save_env(void)
{
    for (int i = 0; i < NCARRIED; i++) {
        const char *v = getenv(carried[i]);
        if (v) {
            cdm_strlcpy(saved[i], carried[i], sizeof saved[i]);
            cdm_strlcat(saved[i], "=", sizeof saved[i]);
            cdm_strlcat(saved[i], v, sizeof saved[i]);
        }
    }
}

static int has_var(char *const envp[], const char *name)
{
    size_t n = strlen(name);
    for (int i = 0; envp && envp[i]; i++)
        if (!strncmp(envp[i], name, n) && envp[i][n] == '=')
            return 1;
    return 0;
}

/* envp with the interposer's variables and the calling thread's policy. */
static int with_run_env(char *const envp[], char **out, int cap, char *polbuf, size_t polsize)
{
    int n = 0;
    for (int i = 0; envp && envp[i] && n < cap - NCARRIED - 2; i++)
        if (strncmp(envp[i], "CDMFS_RUN_MEMPOLICY=", 20))
            out[n++] = envp[i];
    for (int i = 0; i < NCARRIED; i++)
        if (saved[i][0] && !has_var(envp, carried[i]))
            out[n++] = saved[i];
    cdm_strlcpy(polbuf, "CDMFS_RUN_MEMPOLICY=", polsize);
    mpol_current_env(polbuf + 20, polsize - 20);
    out[n++] = polbuf;
    out[n] = NULL;
    return n;
}

int execve(const char *path, char *const argv[], char *const envp[])
{
    int n = 0;
    while (envp && envp[n])
        n++;
    char *env[n + NCARRIED + 4], pol[700];
    if (!saved[1][0])
        return (int)cdm_ret(RAW3(SYS_execve, path, argv, envp));
    with_run_env(envp, env, n + NCARRIED + 4, pol, sizeof pol);
    return (int)cdm_ret(RAW3(SYS_execve, path, argv, env));
}

int execvpe(const char *file, char *const argv[], char *const envp[])
{
    if (strchr(file, '/'))
        return execve(file, argv, envp);
    const char *path = getenv("PATH");
    if (!path)
        path = "/bin:/usr/bin";
    int err = ENOENT;
    for (const char *p = path;; p++) {
        const char *e = strchr(p, ':');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        char full[4096];
        if (len) {
            memcpy(full, p, len < 4000 ? len : 4000);
            full[len < 4000 ? len : 4000] = 0;
        } else {
            cdm_strlcpy(full, ".", sizeof full);
        }
        cdm_strlcat(full, "/", sizeof full);
        cdm_strlcat(full, file, sizeof full);
        execve(full, argv, envp);
        if (errno != ENOENT && errno != ENOTDIR)
            err = errno;
        if (!e)
            break;
        p = e;
    }
    errno = err;
    return -1;
}

int execvp(const char *file, char *const argv[]) { return execvpe(file, argv, environ); }
int execv(const char *path, char *const argv[]) { return execve(path, argv, environ); }
