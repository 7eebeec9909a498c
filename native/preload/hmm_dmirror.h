/* The interface of Linux's HMM test device (the driver lib/test_hmm.c,
 * the character devices /dev/hmm_dmirror0..3), as cdmfs run emulates it:
 * the layout of the command block and the ioctl numbers a program built
 * against the kernel's lib/test_hmm_uapi.h passes, and the snapshot codes
 * it gets back.  Written here from those interface facts so that cdmfs's own
 * C programs need no kernel source; a program built against the kernel's
 * header gets the same numbers.
 */
#ifndef CDMFS_HMM_DMIRROR_H
#define CDMFS_HMM_DMIRROR_H

#include <stdint.h>
#include <sys/ioctl.h>

/* One command.  In: addr (page aligned, the process's range), ptr (the
 * process's buffer the device copies to or from; one byte a page for a
 * snapshot), npages.  Out: cpages (pages copied, migrated or snapshot),
 * faults (device fault rounds the command took). */
struct hmm_dmirror_cmd {
    uint64_t addr;
    uint64_t ptr;
    uint64_t npages;
    uint64_t cpages;
    uint64_t faults;
};

#define HMM_DMIRROR_READ            _IOWR('H', 0x00, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_WRITE           _IOWR('H', 0x01, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_DEV  _IOWR('H', 0x02, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_SYS  _IOWR('H', 0x03, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_SNAPSHOT        _IOWR('H', 0x04, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_EXCLUSIVE       _IOWR('H', 0x05, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_CHECK_EXCLUSIVE _IOWR('H', 0x06, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_RELEASE         _IOWR('H', 0x07, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_FLAGS           _IOWR('H', 0x08, struct hmm_dmirror_cmd)

/* HMM_DMIRROR_FLAGS takes its flags in npages. */
#define HMM_DMIRROR_FLAG_FAIL_ALLOC (1ULL << 0)   /* the next device allocation fails */

/* A snapshot's byte for a page. */
#define HMM_DMIRROR_PROT_ERROR               0xFF  /* no mapping, or PROT_NONE */
#define HMM_DMIRROR_PROT_NONE                0x00  /* not populated */
#define HMM_DMIRROR_PROT_READ                0x01
#define HMM_DMIRROR_PROT_WRITE               0x02
#define HMM_DMIRROR_PROT_PMD                 0x04  /* never here: no huge pages */
#define HMM_DMIRROR_PROT_PUD                 0x08  /* never here */
#define HMM_DMIRROR_PROT_ZERO                0x10  /* the zero page */
#define HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL   0x20  /* in this device's private memory */
#define HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE  0x30  /* in another device's */
#define HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL  0x40  /* in this device's coherent memory */
#define HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE 0x50  /* in another device's */

#endif
