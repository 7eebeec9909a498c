/*
 * cdmfs.h - the C API of cdmfs for programs that want the emulated devices.
 *
 * Every call takes a pointer range inside one or more MAP_SHARED mappings of
 * regions' data files (MOUNT/regions/NAME/data, mapped by the program itself
 * or by `cdmfs run`).  The library finds each mapping in /proc/self/maps (the
 * mapped file's path gives the mount and the region, the line the file
 * offset) and sends the same requests a shell user would write with echo:
 * devices/DEV/access, regions/NAME/migrate, regions/NAME/advise,
 * regions/NAME/pagemap.  A range over several mappings or regions is split
 * into one request per piece (contiguous mappings of one region are one
 * piece); the whole range is checked before the first request is sent, and
 * the pieces run in address order: a failure stops at its piece, the work of
 * the pieces before it stays done (and counted in the result, if any).
 *
 * Errors: -1 and errno, as system calls do; cdmfs_last_error() gives this
 * thread's last failure as a sentence.  Common to every call:
 *   EFAULT  a byte of the range is not in a MAP_SHARED mapping of a cdmfs
 *           region's data file (unmapped, anonymous, another file,
 *           MAP_PRIVATE), or the range wraps around
 *   EINVAL  a malformed request (bad op, advice or target; a range beyond the
 *           end of the data file), as the control file answers it
 *   ENODEV  no such device, or the device (the target) is offline
 *   other   what the control file answered (EIO, ENOMEM, EBUSY, ...)
 * A length of 0 does nothing and succeeds.  The library keeps no state and
 * is safe to call from several threads.
 *
 * The mapping may be the program's own (mmap of MOUNT/regions/NAME/data) or
 * made for it (`cdmfs run`); the library keeps nothing between calls, so
 * mappings may come and go.
 *
 * Build:  cc prog.c $(cdmfs capi --cflags) $(cdmfs capi --libs)
 */
#ifndef CDMFS_H
#define CDMFS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CDMFS_PAGE_SIZE 4096

/* Device access ops: devices/DEV/access's OP words. */
enum cdmfs_op {
    CDMFS_READ = 0,     /* the device reads the range; crc32 of the bytes it read */
    CDMFS_WRITE = 1,    /* the device fills the range with the byte arg (0-255) */
    CDMFS_ADD = 2,      /* the device adds arg to every 64-bit little-endian word */
    CDMFS_TOUCH = 3,    /* the device reads the range, no checksum */
};

/* The answer of a device access, summed over the pieces of the range.  The
 * figures are those of the access file's result line. */
struct cdmfs_access_result {
    uint64_t bytes;         /* bytes accessed */
    uint64_t faults;        /* device faults */
    uint64_t migrated;      /* pages migrated into device memory by those faults */
    uint64_t local_bytes;   /* bytes accessed in the device's own memory */
    uint64_t remote_bytes;  /* bytes accessed over the link */
    uint64_t modeled_ns;    /* modeled time */
    uint32_t crc32;         /* CDMFS_READ: CRC-32 (zlib's) of the whole range */
};

/* The answer of a migration, summed over the pieces of the range (pages). */
struct cdmfs_migrate_result {
    uint64_t requested;
    uint64_t migrated;
    uint64_t skipped;       /* pinned, poisoned, target full...: not an error */
};

/*
 * Runs a device kernel (OP) of DEVICE ("gpu0", "cdm0") on [addr, addr+len).
 * addr and len must be page aligned (EINVAL): a device works on whole pages,
 * and a write or add would otherwise change bytes outside the range.  arg is
 * the byte of CDMFS_WRITE and the addend of CDMFS_ADD (two's complement for a
 * negative one), ignored otherwise.  With the device's fault policy `migrate`
 * (private memory: gpu0) the pages move into device memory; a later CPU
 * access faults them back.  With `remote` (coherent: cdm0) they stay where
 * they are.  res may be NULL.  EINVAL for an unknown op, ENODEV for an
 * unknown or offline device.
 */
int cdmfs_device_access(const char *device, int op, void *addr, size_t len, uint64_t arg,
                        struct cdmfs_access_result *res);

/*
 * Migrates the pages holding [addr, addr+len) (rounded out to whole pages) to
 * target: "gpu0" or "private:gpu0" (device-private memory), "cdm0" (a
 * coherent device: its node), "1" or "node:1" (a node), or "cpu" (system
 * RAM: the first node with CPUs and memory).  Synchronous: the pages are
 * there when it returns, except those skipped (counted in res, which may be
 * NULL); a skipped page is not an error, as with move_pages(2).
 */
int cdmfs_migrate(void *addr, size_t len, const char *target, struct cdmfs_migrate_result *res);

/*
 * Asks for the pages holding [addr, addr+len) to be moved to target (as
 * cdmfs_migrate spells it) ahead of use, as cudaMemPrefetchAsync does: the
 * `prefetch:TARGET` advice.  Where the mount does not take that advice yet,
 * the pages are migrated now instead (synchronously).
 */
int cdmfs_prefetch(void *addr, size_t len, const char *target);

/*
 * Gives advice on the pages holding [addr, addr+len) (rounded out to whole
 * pages): a word of regions/NAME/advise, passed as is: "pin", "unpin", and
 * where the mount takes them "preferred_location:TARGET",
 * "accessed_by:DEVICE", "read_mostly", "unset:ADVICE".  EINVAL for advice
 * the mount does not know.
 */
int cdmfs_advise(void *addr, size_t len, const char *advice);

/*
 * Where the page holding addr lives, in buf (NUL-terminated): "node:N" (in
 * node N's memory, which the CPU maps; a coherent device's memory is its
 * node), the device's name ("gpu0": in its private memory, which the CPU
 * cannot map: a CPU access faults it back), "none" (never touched) or
 * "poisoned".  The strings other than "none" and "poisoned" are migration
 * targets.  Returns the node id (>= 0) for "node:N", CDMFS_WHERE_OTHER (-2)
 * for the others, -1 on error (ERANGE: buf too small).  Frames are visible
 * to root only (pagemap); for anyone else the answer comes from numa_maps
 * and fails with EACCES when the page's policy range holds pages in more
 * than one place.
 */
#define CDMFS_WHERE_OTHER (-2)
int cdmfs_where(const void *addr, char *buf, size_t buflen);

/* This thread's last failure as a sentence ("" if none yet). */
const char *cdmfs_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* CDMFS_H */
