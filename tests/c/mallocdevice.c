/*
 * The seeds' headline scenario, unmodified but for the library call: a
 * program malloc()s a buffer and fills it, hands the pointer to a "library"
 * that runs a kernel on a device (the C API, libcdmfs), and reads the results
 * back on the CPU.  Run under `cdmfs run` by tests/test_run_capi.py.
 *
 *   mallocdevice DEVICE NPAGES [TARGET]
 *       TARGET: migrate the buffer there first (cdm0: its node).
 * Prints "where BEFORE", the kernel's "faults MIGRATED", "where AFTER_KERNEL",
 * waits for a line on stdin (the test looks at the mount), checks every word
 * on the CPU, then prints "where AFTER_CPU" and "ok".  Exit 2 on a failure.
 */
#define _GNU_SOURCE
#include <cdmfs.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096UL

static void die(const char *what)
{
    fprintf(stderr, "%s: %s (%s)\n", what, strerror(errno), cdmfs_last_error());
    exit(2);
}

static void where(const char *label, const void *p)
{
    char buf[64];
    if (cdmfs_where(p, buf, sizeof buf) == -1)
        die("cdmfs_where");
    printf("%s %s\n", label, buf);
}

/* The "library": adds 1000 to every 64-bit word on the device. */
static void library_kernel(const char *device, uint64_t *p, size_t len)
{
    struct cdmfs_access_result res;
    if (cdmfs_device_access(device, CDMFS_ADD, p, len, 1000, &res) == -1)
        die("cdmfs_device_access");
    printf("kernel %llu %llu\n", (unsigned long long)res.faults, (unsigned long long)res.migrated);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    size_t len = strtoul(argv[2], 0, 0) * PAGE, words = len / 8;
    uint64_t *p = aligned_alloc(PAGE, len);
    if (!p)
        die("aligned_alloc");
    for (size_t i = 0; i < words; i++)
        p[i] = i;
    where("before", p);
    if (argc > 3 && cdmfs_migrate(p, len, argv[3], NULL) == -1)
        die("cdmfs_migrate");
    library_kernel(argv[1], p, len);
    where("after_kernel", p);
    fflush(stdout);
    char line[8];
    if (!fgets(line, sizeof line, stdin))
        return 3;
    for (size_t i = 0; i < words; i++)
        if (p[i] != i + 1000) {
            fprintf(stderr, "word %zu: %llu\n", i, (unsigned long long)p[i]);
            return 2;
        }
    where("after_cpu", p);
    free(p);
    puts("ok");
    return 0;
}
