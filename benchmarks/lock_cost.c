/* What one uncontended lock/unlock pair costs in C, for the PBM ring's choice of lock (BUILD_NOTES,
 * "SAGE mailboxes"): flock on the ring file (layout 1), an OFD byte-range lock, and the robust
 * process-shared pthread mutex of layout 2; a bare syscall for scale. python -m benchmarks.mailbox
 * compiles and runs it; by hand: cc -O2 benchmarks/lock_cost.c -o /tmp/lock_cost && /tmp/lock_cost DIR
 * Prints one JSON object of microseconds per pair. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    char path[4096];
    snprintf(path, sizeof path, "%s/lock-cost-%d", argc > 1 ? argv[1] : "/tmp", (int)getpid());
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || ftruncate(fd, 4096) < 0)
        return 1;
    pthread_mutex_t *mutex = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    unlink(path);
    if (mutex == MAP_FAILED)
        return 1;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    pthread_mutex_init(mutex, &attr);
    const int n = 200000;
    double t = now();
    for (int i = 0; i < n; i++) {
        flock(fd, LOCK_EX);
        flock(fd, LOCK_UN);
    }
    double flock_us = (now() - t) / n * 1e6;
    struct flock range = {.l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    t = now();
    for (int i = 0; i < n; i++) {
        range.l_type = F_WRLCK;
        fcntl(fd, F_OFD_SETLKW, &range);
        range.l_type = F_UNLCK;
        fcntl(fd, F_OFD_SETLK, &range);
    }
    double ofd_us = (now() - t) / n * 1e6;
    t = now();
    for (int i = 0; i < 10 * n; i++) {
        pthread_mutex_lock(mutex);
        pthread_mutex_unlock(mutex);
    }
    double mutex_us = (now() - t) / (10 * n) * 1e6;
    t = now();
    for (int i = 0; i < n; i++)
        getppid();
    double syscall_us = (now() - t) / n * 1e6;
    printf("{\"flock_pair\": %.4f, \"ofd_lock_pair\": %.4f, \"robust_mutex_pair\": %.4f, \"syscall\": %.4f}\n",
           flock_us, ofd_us, mutex_us, syscall_us);
    return 0;
}
