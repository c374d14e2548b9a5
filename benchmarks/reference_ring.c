/* A reference point for the PBM ring's throughput (BUILD_NOTES, "SAGE mailboxes"): what two processes
 * on this machine move through shared memory with nothing of the mailbox's own: a single-producer
 * single-consumer ring of 1024 slots in one shared mapping, no lock, no Python, one memcpy into the
 * slot and one out of it per record (the two copies every copying queue makes), head and tail as
 * release/acquire indices published after every record, each side re-reading the other's index only
 * when the ring looks empty or full (the usual single-producer single-consumer queue). Not an upper
 * bound: a ring that publishes once per batch of records moves more. Optionally the payload's crc32
 * on both sides, as the mailbox computes it (sage/_pbm_crc32.c). Each side busy-polls; the two
 * processes are pinned to the CPUs given.
 *
 * python -m benchmarks.mailbox compiles and runs it; by hand:
 *   cc -O2 -Isage benchmarks/reference_ring.c sage/_pbm_crc32.c -o /tmp/reference_ring && /tmp/reference_ring [TX RX]
 * Prints one JSON object: records/s per "size" and "size-crc". */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "_pbm_crc32.h"

#if defined(__x86_64__) || defined(__i386__)
#define RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define RELAX() __asm__ __volatile__("yield")
#else
#define RELAX() ((void)0)
#endif

#define SLOTS 1024
#define RECORDS 400000

typedef struct {
    _Alignas(64) uint64_t head;  /* records written; the producer's line */
    _Alignas(64) uint64_t tail;  /* records read; the consumer's line */
    _Alignas(64) uint64_t done_ns;
} indices_t;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void pin(int cpu) {
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static void consume(indices_t *ix, char *slots, size_t stride, size_t size, int crc) {
    char *local = malloc(size);
    uint32_t sink = 0;
    uint64_t head = 0;  /* the producer's index as last seen: re-read only when it says empty */
    for (uint64_t n = 0; n < RECORDS; n++) {
        while (head <= n) {
            head = __atomic_load_n(&ix->head, __ATOMIC_ACQUIRE);
            if (head <= n)
                RELAX();
        }
        const char *slot = slots + (n % SLOTS) * stride;
        memcpy(local, slot + 8, size);
        if (crc && pbm_crc32(0, local, size) != *(const uint32_t *)slot)
            sink++;
        __atomic_store_n(&ix->tail, n + 1, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&ix->done_ns, (uint64_t)now_ns(), __ATOMIC_RELEASE);
    if (sink)
        fprintf(stderr, "reference_ring: %u checksum mismatches\n", sink);
    free(local);
}

static double run(size_t size, int crc, int tx, int rx) {
    size_t stride = (size + 8 + 63) & ~(size_t)63;
    size_t bytes = 4096 + SLOTS * stride;
    char *base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        exit(1);
    memset(base, 0, bytes);  /* fault every page in before timing */
    indices_t *ix = (indices_t *)base;
    char *slots = base + 4096;
    pid_t child = fork();
    if (child == 0) {
        pin(rx);
        consume(ix, slots, stride, size, crc);
        _exit(0);
    }
    pin(tx);
    char *payload = malloc(size);
    for (size_t i = 0; i < size; i++)
        payload[i] = (char)(i * 31 + 7);
    usleep(20000);  /* let the consumer start polling */
    int64_t start = now_ns();
    uint64_t tail = 0;  /* the consumer's index as last seen: re-read only when it says full */
    for (uint64_t n = 0; n < RECORDS; n++) {
        while (n - tail >= SLOTS) {
            tail = __atomic_load_n(&ix->tail, __ATOMIC_ACQUIRE);
            if (n - tail >= SLOTS)
                RELAX();
        }
        char *slot = slots + (n % SLOTS) * stride;
        *(uint32_t *)slot = crc ? pbm_crc32(0, payload, size) : 0;
        memcpy(slot + 8, payload, size);
        __atomic_store_n(&ix->head, n + 1, __ATOMIC_RELEASE);
    }
    waitpid(child, NULL, 0);
    double seconds = (double)((int64_t)ix->done_ns - start) * 1e-9;
    free(payload);
    munmap(base, bytes);
    return RECORDS / seconds;
}

int main(int argc, char **argv) {
    int tx = argc > 2 ? atoi(argv[1]) : -1, rx = argc > 2 ? atoi(argv[2]) : -1;
    pbm_crc32_init();
    size_t sizes[] = {64, 4096};
    printf("{");
    for (int i = 0; i < 2; i++)
        for (int crc = 0; crc < 2; crc++)
            printf("%s\"%zu%s\": %.0f", i || crc ? ", " : "", sizes[i], crc ? "-crc" : "", run(sizes[i], crc, tx, rx));
    printf("}\n");
    return 0;
}
