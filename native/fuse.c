/* fuse.c — the raw FUSE_NOTIFY_INVAL_INODE write on /dev/fuse (the message
 * the kernel's fs/fuse/dev.c reads in fuse_notify_inval_inode()), and the
 * range write-back that goes before it. */
#define _GNU_SOURCE
#include "cdmcore.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

/* ------------------------------------------------------------ FUSE notify */

int cdm_fuse_inval(int fd, uint64_t ino, int64_t off, int64_t len)
{
    /* struct fuse_out_header { u32 len; s32 error; u64 unique; } with
     * error = FUSE_NOTIFY_INVAL_INODE (2), then
     * struct fuse_notify_inval_inode_out { u64 ino; s64 off; s64 len; }. */
    struct {
        uint32_t len;
        int32_t error;
        uint64_t unique;
        uint64_t ino;
        int64_t off;
        int64_t len2;
    } msg = {40, 2, 0, ino, off, len};
    /* Never write the message into anything but /dev/fuse (misc 10:229): a
     * stale or wrong descriptor would take it as data and report success. */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISCHR(st.st_mode) || major(st.st_rdev) != 10 || minor(st.st_rdev) != 229)
        return -EINVAL;
    ssize_t n = write(fd, &msg, sizeof(msg));
    if (n < 0)
        return -errno;
    return n == (ssize_t)sizeof(msg) ? 0 : -EIO;
}

int cdm_fuse_writeback(int fd, int64_t off, int64_t len)
{
    if (sync_file_range(fd, off, len, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                        SYNC_FILE_RANGE_WAIT_AFTER) < 0)
        return -errno;
    return 0;
}
