/* device.c — a device's compute kernel on the frames where the pages are
 * (cdm_device_op) and the CRC-32 of its reads (the device side of the
 * kernel's lib/test_hmm.c). */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <libdeflate.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ device ops */

/* libdeflate's CRC-32 (PCLMULQDQ folding where the CPU has it, picked at run
 * time); the result is zlib's crc32, continuing from crc as zlib does. */
uint32_t cdm_crc32(uint32_t crc, const uint8_t *buf, uint64_t len)
{
    return libdeflate_crc32(crc, buf, (size_t)len);
}

/*
 * Pages are read in address order whatever their order in the region: frames
 * handed out again from the free stack come back descending or scattered,
 * and reading memory a page at a time out of order is up to 40% slower than
 * one forward sweep.  The CRC register is linear over GF(2): with T(s, M) the
 * register after message M from state s (zlib's crc32 is ~T(~crc, M)),
 * T(s, P) = A(s) ^ T(0, P) for a page P, A advancing a state over a page of
 * zero bytes.  So each page's T(0, P) is taken in address order, then they
 * are chained in page order, four table lookups a page.
 */
#define CRC_CHUNK_SHIFT 16
#define CRC_CHUNK (1U << CRC_CHUNK_SHIFT)  /* pages sorted at once (256 MiB of data) */
static uint32_t crc_shift[4][256];         /* A, a byte of the state at a time */

static void crc_shift_init(void)
{
    static const uint8_t zero[PAGE];
    uint32_t basis[32];
    for (int i = 0; i < 32; i++)
        basis[i] = ~libdeflate_crc32(~(1U << i), zero, PAGE);
    for (int b = 0; b < 4; b++)
        for (int v = 0; v < 256; v++) {
            uint32_t x = 0;
            for (int i = 0; i < 8; i++)
                if (v & (1 << i))
                    x ^= basis[8 * b + i];
            crc_shift[b][v] = x;
        }
}

static inline uint32_t crc_advance_page(uint32_t s)
{
    return crc_shift[0][s & 0xff] ^ crc_shift[1][(s >> 8) & 0xff]
        ^ crc_shift[2][(s >> 16) & 0xff] ^ crc_shift[3][s >> 24];
}

/* Sorts n keys (LSD radix, a byte at a time from bit lo up, skipping bytes
 * that are the same in every key); tmp has room for n. */
static void radix_sort(uint64_t *key, uint64_t *tmp, uint64_t n, int lo)
{
    uint64_t all_or = 0, all_and = ~0ULL;
    for (uint64_t k = 0; k < n; k++) {
        all_or |= key[k];
        all_and &= key[k];
    }
    for (int sh = lo; sh < 64; sh += 8) {
        if (!(((all_or ^ all_and) >> sh) & 0xff))
            continue;
        uint64_t count[257] = {0};
        for (uint64_t k = 0; k < n; k++)
            count[((key[k] >> sh) & 0xff) + 1]++;
        for (int d = 0; d < 256; d++)
            count[d + 1] += count[d];
        for (uint64_t k = 0; k < n; k++)
            tmp[count[(key[k] >> sh) & 0xff]++] = key[k];
        memcpy(key, tmp, n * sizeof(*key));
    }
}

/* Up to CRC_CHUNK pages: in order if ascending, else sorted (0, or -ENOMEM). */
static int crc_pages_chunk(uint32_t *crc, uint8_t *const *pages, uint64_t n)
{
    uint64_t k = 1;
    while (k < n && (uintptr_t)pages[k] > (uintptr_t)pages[k - 1])
        k++;
    if (k >= n) {
        for (k = 0; k < n; k++)
            *crc = libdeflate_crc32(*crc, pages[k], PAGE);
        return 0;
    }
    /* key: the page's address above bit CRC_CHUNK_SHIFT, its index below
     * (user addresses are page aligned and below 2^48). */
    uint64_t *key = malloc(n * sizeof(*key));
    uint64_t *tmp = malloc(n * sizeof(*tmp));
    uint32_t *part = malloc(n * sizeof(*part));
    if (!key || !tmp || !part) {
        free(key);
        free(tmp);
        free(part);
        return -ENOMEM;
    }
    for (k = 0; k < n; k++)
        key[k] = ((uint64_t)(uintptr_t)pages[k] >> CDM_PAGE_SHIFT << CRC_CHUNK_SHIFT) | k;
    radix_sort(key, tmp, n, CRC_CHUNK_SHIFT);
    for (k = 0; k < n; k++) {
        const uint8_t *f = (const uint8_t *)(uintptr_t)(key[k] >> CRC_CHUNK_SHIFT << CDM_PAGE_SHIFT);
        part[key[k] & (CRC_CHUNK - 1)] = ~libdeflate_crc32(~0U, f, PAGE);  /* T(0, P) */
    }
    uint32_t s = ~*crc;
    for (k = 0; k < n; k++)
        s = crc_advance_page(s) ^ part[k];
    *crc = ~s;
    free(key);
    free(tmp);
    free(part);
    return 0;
}

uint32_t cdm_crc32_pages(uint32_t crc, uint8_t *const *pages, uint64_t n)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, crc_shift_init);
    for (uint64_t o = 0; o < n; o += CRC_CHUNK) {
        uint64_t c = n - o < CRC_CHUNK ? n - o : CRC_CHUNK;
        if (crc_pages_chunk(&crc, pages + o, c) < 0)
            for (uint64_t k = o; k < o + c; k++)    /* no memory: in page order */
                crc = libdeflate_crc32(crc, pages[k], PAGE);
    }
    return crc;
}

int cdm_device_op(struct cdm_machine *m, struct cdm_region *r, uint64_t first, uint64_t n,
                  int op, uint64_t arg, uint64_t own_pools, uint64_t private_ok,
                  struct cdm_op_result *res)
{
    uint32_t crc = res->crc;    /* a read cut into calls goes on from the last */
    memset(res, 0, sizeof(*res));
    res->crc = crc;
    int ret = 0;
    if (n > UINT64_MAX - first) {
        res->page = first;      /* the range wraps around */
        return -EINVAL;
    }
    machine_lock(m);
    for (uint64_t i = first; i < first + n; i++) {
        uint64_t pte = i < r->npages ? r->pte[i] : CDM_PTE_POISONED;
        if (pte & CDM_PTE_POISONED)
            ret = -EIO;
        else if (pte & CDM_PTE_LOCKED)
            ret = -EAGAIN;
        else if (!(pte & CDM_PTE_PRESENT))
            ret = -ENOENT;
        else if ((pte & CDM_PTE_PRIVATE) && !(private_ok & (1ULL << pte_pool(pte))))
            ret = -EREMOTE;
        else
            continue;
        res->page = i;
        goto out;
    }
    /* A read collects the frames of up to CRC_CHUNK pages at a time, then
     * checksums them in address order (in page order if there is no memory). */
    uint64_t npages = 0, room = n < CRC_CHUNK ? n : CRC_CHUNK;
    uint8_t **pages = op == CDM_OP_READ ? malloc(room * sizeof(*pages)) : NULL;
    for (uint64_t i = first; i < first + n; i++) {
        uint64_t pte = r->pte[i];
        uint8_t *f = frame_addr(m, pte);
        if (own_pools & (1ULL << pte_pool(pte)))
            res->local_bytes += PAGE;
        else
            res->remote_bytes += PAGE;
        if (pte & CDM_PTE_CPU)
            res->cpu_pages++;
        switch (op) {
        case CDM_OP_READ:
            if (pages) {
                pages[npages++] = f;
                if (npages == room) {
                    res->crc = cdm_crc32_pages(res->crc, pages, npages);
                    npages = 0;
                }
            } else
                res->crc = cdm_crc32(res->crc, f, PAGE);
            break;
        case CDM_OP_WRITE:
            memset(f, (int)(arg & 0xff), PAGE);
            break;
        case CDM_OP_COPYOUT:
            memcpy((uint8_t *)(uintptr_t)arg + (i - first) * PAGE, f, PAGE);
            break;
        case CDM_OP_COPYIN:
            memcpy(f, (const uint8_t *)(uintptr_t)arg + (i - first) * PAGE, PAGE);
            break;
        case CDM_OP_ADD:
            for (int w = 0; w < PAGE; w += 8) {
                uint64_t v;
                memcpy(&v, f + w, 8);
                v += arg;
                memcpy(f + w, &v, 8);
            }
            break;
        default:
            break;
        }
        if ((op == CDM_OP_WRITE || op == CDM_OP_ADD || op == CDM_OP_COPYIN) && !(pte & CDM_PTE_DIRTY))
            pte_set(m, r, i, pte | CDM_PTE_DIRTY);
    }
    if (pages) {
        res->crc = cdm_crc32_pages(res->crc, pages, npages);
        free(pages);
    }
out:
    machine_unlock(m);
    return ret;
}
