/* sage._pbm: the PBM ring's push / pop in C, on the binary layout of sage/layout.py (version 2).
 *
 * The pure-Python engine (sage/pbm_python.py) and this one follow the same protocol on the same bytes,
 * so processes using either share a ring. Every access to the indices, counters and slots happens
 * under the ring's robust process-shared pthread mutex (header offset 256): uncontended it costs no
 * syscall (about 20 ns here, against 1.3 us for the flock pair version 1 used), and when its holder
 * dies the kernel marks it EOWNERDEAD so the next locker repairs it and goes on (the ring is
 * consistent at every store: a half-written slot is never committed). Indices and the slot seq are
 * stored with release atomics so that the unlocked peeks (a hint only, used to skip the lock on an
 * empty ring and to busy-poll) never see half a value.
 *
 * Python objects are never allocated under the mutex except the payload bytes (not GC-tracked, so no
 * finalizer can run and re-enter the ring); Records are built after unlocking. The GIL is released
 * while blocking on the mutex, busy-polling and sleeping on the doorbell. The costly part of the
 * slot CRC (the payload's) is computed outside the mutex on both sides: a producer before locking,
 * a consumer on its copy after unlocking (a mismatch is then counted torn under the mutex again).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "_pbm_crc32.h"

#define LAYOUT_VERSION 2
#define HEADER_SIZE 4096
#define SLOT_HEADER 56
#define STATE_OFFSET 84
#define COUNTERS_OFFSET 128
#define MUTEX_OFFSET 256
#define MUTEX_BYTES 64
#define STATE_LIVE 1
#define STATE_RETIRED 2
/* How long a locker retries before it blocks in the kernel. A holder copying a batch (push_many,
 * pop_many, pop_into of 64 x 4 KiB) keeps the lock for tens of microseconds; blocking then costs a
 * futex sleep and wake-up of about as much again. Spinning up to 50 us instead of 100 tries (~10 us)
 * raised pop_into's 4 KiB throughput from 1.8-2.0 to 2.7-2.9 M records/s on the 2-core VM. */
#define LOCK_SPIN_NS 50000LL
#define SPIN_YIELD_NS 100000LL        /* a busy-polling consumer yields its core this often */
#define POLL_CHUNK_NS 10000000LL       /* busy-polling re-takes the GIL this often to run signal handlers */
#define FULL_PAUSE_MIN_NS 50000LL      /* a producer blocked on FULL backs off 50 us .. 1 ms, as in Python */
#define FULL_PAUSE_MAX_NS 1000000LL

enum { C_WRITE, C_READ, C_FULL, C_TOO_BIG, C_EXPIRED, C_TORN, C_NEXT_PRODUCER, C_WAKE_UNTIL, C_SLEEPERS, N_COUNTERS };
enum { WAIT_SPIN, WAIT_SLEEP, WAIT_ADAPTIVE };

typedef struct {            /* one slot's first 56 bytes, as sage/layout.py documents them */
    uint64_t seq;           /* position + 1 once committed */
    uint32_t crc;           /* crc32 of bytes [16, 56 + length) (PAYLOAD_CRC) or [16, 56) */
    uint32_t length;
    uint32_t producer;
    uint32_t pid;
    uint64_t producer_seq;
    uint64_t pushed_ns;
    uint64_t deadline_ns;
    uint32_t tag;
    uint32_t reserved;
} slot_t;

#define BODY_OFFSET 16      /* the CRC covers the slot's bytes [16, 56) after the payload's own CRC */
#define BODY_BYTES 40

_Static_assert(sizeof(slot_t) == SLOT_HEADER, "slot header is 56 bytes");
_Static_assert(offsetof(slot_t, producer) == 16 && offsetof(slot_t, tag) == 48, "slot offsets");
_Static_assert(sizeof(pthread_mutex_t) <= MUTEX_BYTES, "the mutex fits its 64 header bytes");

static inline uint64_t load_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void bump(uint64_t *p) { store_rel(p, *p + 1); }  /* a counter, under the mutex */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int64_t sat_add(int64_t a, int64_t b) { return a > INT64_MAX - b ? INT64_MAX : a + b; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- what sage.mailbox hands over at import (configure) ---- */
static PyTypeObject *record_type;
static PyObject *zero;      /* the default tag */
static PyObject *status_ok, *status_full, *status_too_big, *mailbox_error, *retired_error, *warn;

typedef struct {
    PyObject_HEAD
    char *base;             /* this handle's own MAP_SHARED mapping of the ring file */
    size_t size;
    uint64_t *ctr;
    uint32_t *state;
    pthread_mutex_t *mutex;
    uint64_t record_size, stride, capacity;
    int payload_crc;
    int bell;               /* a dup of the doorbell FIFO, owned by this object */
    int wait;
    int64_t spin_ns, sleep_slice_ns;
    int64_t producer;       /* -1: no producer id taken yet */
    unsigned long long producer_seq;
    uint32_t pid;
    int busy;               /* calls in progress; changed with the GIL held */
    int closed;             /* read without the GIL by waiting loops */
    int owner_died;         /* the last lock repaired a dead holder's mutex: log it after unlocking */
    uint64_t torn_first, torn_count;
    PyObject *name, *clock, *test_hook;
} Ring;

typedef struct {            /* one record taken under the mutex; checked and made into a Record after unlocking */
    PyObject *payload;      /* NULL when the batch copies into a caller's buffer (pop_into) */
    slot_t head;            /* a copy of the slot's first 56 bytes */
} taken_t;

typedef struct {            /* the records of one pop / pop_many / pop_into; grows under the mutex (C memory only) */
    taken_t *items;
    Py_ssize_t len, cap, max;
    taken_t one;
    char *dest;             /* pop_into: record i's payload goes to dest + i * record_size; else NULL */
} batch_t;

static int batch_room(batch_t *b) {
    if (b->len < b->cap)
        return 0;
    Py_ssize_t cap = b->cap * 2 < b->max ? b->cap * 2 : b->max;
    taken_t *items = b->items == &b->one ? PyMem_Malloc(cap * sizeof(taken_t))
                                         : PyMem_Realloc(b->items, cap * sizeof(taken_t));
    if (items == NULL)
        return -1;
    if (b->items == &b->one)
        items[0] = b->one;
    b->items = items;
    b->cap = cap;
    return 0;
}

static void batch_free(batch_t *b) {
    if (b->items != &b->one)
        PyMem_Free(b->items);
}

static slot_t *slot_at(Ring *r, uint64_t position) {
    return (slot_t *)(r->base + HEADER_SIZE + (position % r->capacity) * r->stride);
}

/* Where the i-th taken record's payload copy lives: its bytes object, or its row of the caller's buffer. */
static char *taken_payload(Ring *r, batch_t *b, Py_ssize_t i) {
    return b->dest ? b->dest + i * (Py_ssize_t)r->record_size : PyBytes_AS_STRING(b->items[i].payload);
}

static int is_closed(Ring *r) { return __atomic_load_n(&r->closed, __ATOMIC_RELAXED); }
static int is_live(Ring *r) { return __atomic_load_n(r->state, __ATOMIC_ACQUIRE) == STATE_LIVE; }

static void release_mapping(Ring *r) {
    if (r->base != NULL) {
        munmap(r->base, r->size);
        r->base = NULL;
    }
    if (r->bell >= 0) {
        close(r->bell);
        r->bell = -1;
    }
}

/* Every method runs between enter() and leave(): a close() from another thread while one waits
 * only marks the handle; the last call to leave unmaps, so nobody touches an unmapped ring. */
static int enter(Ring *r) {
    if (r->closed) {
        PyErr_Format(PyExc_ValueError, "mailbox %R: this handle is closed; attach again", r->name);
        return -1;
    }
    r->busy++;
    return 0;
}

static void leave(Ring *r) {
    if (--r->busy == 0 && r->closed)
        release_mapping(r);
}

static int raise_if_closed(Ring *r) {
    if (!r->closed)
        return 0;
    PyErr_Format(PyExc_ValueError, "mailbox %R: this handle was closed while waiting; attach again", r->name);
    return -1;
}

/* ---- the lock ---- */
static int lock_error(Ring *r, int rc) {
    if (rc == EDEADLK)
        PyErr_Format(PyExc_RuntimeError, "mailbox %R: this thread already holds the ring's lock (a test hook "
                     "or finalizer re-entered the mailbox)", r->name);
    else if (rc == ENOTRECOVERABLE)
        PyErr_Format(mailbox_error, "mailbox %R: its lock is not recoverable (a process died holding it and "
                     "the repair did not finish); unlink it and create the mailbox again", r->name);
    else {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return -1;
}

static int lock_raw(Ring *r) {
    int rc = pthread_mutex_trylock(r->mutex);
    int64_t give_up = rc == EBUSY ? sat_add(mono_ns(), LOCK_SPIN_NS) : 0;
    for (int i = 1; rc == EBUSY; i++) {
        cpu_relax();
        rc = pthread_mutex_trylock(r->mutex);
        if (rc == EBUSY && i % 16 == 0 && mono_ns() >= give_up)
            break;
    }
    if (rc == EBUSY) {
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_lock(r->mutex);
        Py_END_ALLOW_THREADS
    }
    if (rc == EOWNERDEAD) {  /* its holder died inside a critical section; nothing it wrote is committed */
        rc = pthread_mutex_consistent(r->mutex);
        r->owner_died = 1;
    }
    return rc ? lock_error(r, rc) : 0;
}

static void unlock(Ring *r) { pthread_mutex_unlock(r->mutex); }

static int lock_live(Ring *r) {
    if (lock_raw(r) < 0)
        return -1;
    if (is_live(r))
        return 0;
    unlock(r);
    PyErr_Format(retired_error, "mailbox %R was recreated or unlinked by another process; attach again", r->name);
    return -1;
}

/* Logs what happened under the last lock (never under the mutex: a handler may do anything). */
static void report(Ring *r) {
    if (!r->owner_died && !r->torn_count)
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *res = NULL;
    if (r->owner_died)
        res = PyObject_CallFunction(warn, "sO", "mailbox %r: a process died holding the ring's lock; the lock was "
                                    "repaired (nothing it had not committed is visible)", r->name);
    Py_XDECREF(res);
    if (r->torn_count) {
        res = PyObject_CallFunction(warn, "sOKK", "mailbox %r: %d slot(s) from record %d failed their seq/crc "
                                    "check; dropped", r->name, (unsigned long long)r->torn_count,
                                    (unsigned long long)r->torn_first);
        Py_XDECREF(res);
    }
    PyErr_Clear();
    PyErr_Restore(type, value, tb);
    r->owner_died = 0;
    r->torn_count = 0;
}

/* ---- arguments ---- */
static int parse_tag(PyObject *tag, uint32_t *out) {
    int overflow = 0;
    long long v = PyLong_Check(tag) ? PyLong_AsLongLongAndOverflow(tag, &overflow) : -1;
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (!PyLong_Check(tag) || overflow || v < 0 || v >= (1LL << 32)) {
        PyErr_Format(PyExc_ValueError, "tag must be an int in [0, 2**32), got %R", tag);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/* The TTL clock: CLOCK_MONOTONIC, or the callable a test installed. */
static int ttl_now(Ring *r, int64_t *out) {
    if (r->clock == Py_None) {
        *out = mono_ns();
        return 0;
    }
    PyObject *v = PyObject_CallNoArgs(r->clock);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int parse_deadline(Ring *r, PyObject *ttl, uint64_t *out) {
    if (ttl == Py_None) {
        *out = 0;
        return 0;
    }
    double s = (PyLong_Check(ttl) || PyFloat_Check(ttl)) ? PyFloat_AsDouble(ttl) : NAN;
    if (s == -1.0 && PyErr_Occurred())
        return -1;
    if (!(s >= 0) || !isfinite(s)) {
        PyErr_Format(PyExc_ValueError, "ttl must be None or a finite number of seconds >= 0, got %R", ttl);
        return -1;
    }
    int64_t now;
    if (ttl_now(r, &now) < 0)
        return -1;
    double ns = s * 1e9;  /* int(ttl * 1e9) in Python: truncated */
    int64_t d = ns >= 9.2e18 ? INT64_MAX : sat_add(now, (int64_t)ns);
    *out = d < 1 ? 1 : (uint64_t)d;
    return 0;
}

/* None / 0 / False: do not wait. A number: wait that many seconds (negative: not at all). inf: for ever. */
static int parse_timeout(PyObject *timeout, int *wait, int64_t *give_up) {
    int truth = PyObject_IsTrue(timeout);
    if (truth < 0)
        return -1;
    *wait = truth;
    *give_up = 0;
    if (!truth)
        return 0;
    double s = PyFloat_AsDouble(timeout);
    if (s == -1.0 && PyErr_Occurred())
        return -1;
    if (isnan(s)) {
        PyErr_Format(PyExc_ValueError, "timeout must be None or a number of seconds (math.inf: wait for ever), "
                     "got %R", timeout);
        return -1;
    }
    int64_t now = mono_ns();
    *give_up = s >= 9.2e9 ? INT64_MAX : (s <= 0 ? now : sat_add(now, (int64_t)(s * 1e9)));
    return 0;
}

/* Arguments by position (the first npos of names) or by keyword, as a Python signature would take
 * them: f(a, b=..., *, c=...). out[] holds the defaults on entry; the first `required` must be given. */
static int parse_args(const char *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      const char *const *names, int n, int npos, int required, PyObject **out) {
    if (nargs > npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d positional argument(s) (%zd given)", fn, npos, nargs);
        return -1;
    }
    int given = 0;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        out[i] = args[i];
        given |= 1 << i;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int i = 0;
        while (i < n && PyUnicode_CompareWithASCIIString(key, names[i]) != 0)
            i++;
        if (i == n || (given & (1 << i))) {
            PyErr_Format(PyExc_TypeError, i == n ? "%s() got an unexpected keyword argument %R"
                                                 : "%s() got multiple values for argument %R", fn, key);
            return -1;
        }
        out[i] = args[nargs + k];
        given |= 1 << i;
    }
    for (int i = 0; i < required; i++)
        if (!(given & (1 << i))) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn, names[i]);
            return -1;
        }
    return 0;
}

static int get_payload(PyObject *obj, Py_buffer *view) {
    return PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS);
}

/* ---- producer side ---- */

/* Writes and commits one record at write_index; 1 if the ring is full; -1 if the test hook raised
 * (nothing committed). payload_crc: crc32(payload), or 0 without PAYLOAD_CRC. The mutex is held. */
static int write_locked(Ring *r, const char *data, uint32_t n, uint32_t tag, uint64_t deadline,
                        uint32_t payload_crc) {
    uint64_t w = r->ctr[C_WRITE];
    if (w - load_acq(&r->ctr[C_READ]) >= r->capacity)
        return 1;
    if (r->producer < 0) {
        r->producer = (int64_t)(r->ctr[C_NEXT_PRODUCER] % (1ULL << 32));
        bump(&r->ctr[C_NEXT_PRODUCER]);
    }
    slot_t *s = slot_at(r, w);
    s->producer = (uint32_t)r->producer;
    s->pid = r->pid;
    s->producer_seq = r->producer_seq;
    s->pushed_ns = (uint64_t)mono_ns();
    s->deadline_ns = deadline;
    s->tag = tag;
    s->reserved = 0;
    char *payload = (char *)s + SLOT_HEADER;
    if (r->test_hook == Py_None) {
        memcpy(payload, data, n);
    } else {  /* fault injection: stop half-way through the payload, the mutex held */
        memcpy(payload, data, n / 2);
        PyObject *res = PyObject_CallFunction(r->test_hook, "s", "push");
        if (res == NULL)
            return -1;
        Py_DECREF(res);
        memcpy(payload + n / 2, data + n / 2, n - n / 2);
    }
    s->crc = pbm_crc32(payload_crc, (char *)s + BODY_OFFSET, BODY_BYTES);
    s->length = n;
    store_rel(&s->seq, w + 1);
    store_rel(&r->ctr[C_WRITE], w + 1);  /* the commit point */
    r->producer_seq++;
    return 0;
}

static uint64_t wake_until_locked(Ring *r) { return r->ctr[C_SLEEPERS] ? r->ctr[C_WAKE_UNTIL] : 0; }

static void ring_bell(Ring *r, uint64_t wake_until) {
    if (wake_until > (uint64_t)mono_ns()) {
        ssize_t ignored = write(r->bell, "\x01", 1);  /* EAGAIN: the FIFO is full of rings already */
        (void)ignored;
    }
}

static int count_too_big(Ring *r) {
    if (lock_live(r) < 0)
        return -1;
    bump(&r->ctr[C_TOO_BIG]);
    unlock(r);
    report(r);
    return 0;
}

static uint32_t payload_crc_of(Ring *r, Py_buffer *view) {
    return r->payload_crc ? pbm_crc32(0, view->buf, (size_t)view->len) : 0;
}

/* One attempt: 0 pushed, 1 full, -1 error. */
static int try_push(Ring *r, Py_buffer *view, uint32_t crc, uint32_t tag, uint64_t deadline, int count_full) {
    if (lock_live(r) < 0)
        return -1;
    int status = write_locked(r, view->buf, (uint32_t)view->len, tag, deadline, crc);
    if (status == 1 && count_full)
        bump(&r->ctr[C_FULL]);
    uint64_t wake_until = status == 0 ? wake_until_locked(r) : 0;
    unlock(r);
    report(r);
    if (status == 0)
        ring_bell(r, wake_until);
    return status;
}

static int pause_ns(int64_t ns) {
    struct timespec t = {ns / 1000000000LL, ns % 1000000000LL};
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&t, NULL);
    Py_END_ALLOW_THREADS
    return PyErr_CheckSignals();
}

static PyObject *push_with_timeout(Ring *r, Py_buffer *view, uint32_t tag, uint64_t deadline, PyObject *timeout) {
    int wait;
    int64_t give_up, pause = FULL_PAUSE_MIN_NS;
    if (parse_timeout(timeout, &wait, &give_up) < 0)
        return NULL;
    uint32_t crc = payload_crc_of(r, view);
    for (;;) {
        int last = !wait || mono_ns() >= give_up;
        int status = try_push(r, view, crc, tag, deadline, last);
        if (status < 0)
            return NULL;
        if (status == 0)
            return Py_NewRef(status_ok);
        if (last)
            return Py_NewRef(status_full);
        int64_t left = give_up - mono_ns();
        if (pause_ns(left < pause ? (left > 0 ? left : 0) : pause) < 0 || raise_if_closed(r) < 0)
            return NULL;
        pause = min64(pause * 2, FULL_PAUSE_MAX_NS);
    }
}

static PyObject *Ring_push(Ring *r, PyObject *const *fast, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"payload", "tag", "ttl", "timeout"};
    PyObject *args[4] = {NULL, zero, Py_None, Py_None};
    if (parse_args("push", fast, nargs, kwnames, names, 4, 1, 1, args) < 0)
        return NULL;
    if (enter(r) < 0)
        return NULL;
    PyObject *result = NULL;
    Py_buffer view;
    if (get_payload(args[0], &view) < 0) {
        leave(r);
        return NULL;
    }
    uint32_t tag;
    uint64_t deadline;
    if (parse_tag(args[1], &tag) == 0 && parse_deadline(r, args[2], &deadline) == 0) {
        if ((uint64_t)view.len > r->record_size)
            result = count_too_big(r) < 0 ? NULL : Py_NewRef(status_too_big);
        else
            result = push_with_timeout(r, &view, tag, deadline, args[3]);
    }
    PyBuffer_Release(&view);
    leave(r);
    return result;
}

/* Pushes views[0..n) in order under one lock until the ring is full; returns how many went in. */
static Py_ssize_t push_views(Ring *r, Py_buffer *views, Py_ssize_t n, uint32_t tag, uint64_t deadline) {
    uint32_t *crcs = PyMem_Malloc((n ? n : 1) * sizeof(uint32_t));
    if (crcs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        crcs[i] = payload_crc_of(r, &views[i]);
    if (lock_live(r) < 0) {
        PyMem_Free(crcs);
        return -1;
    }
    Py_ssize_t pushed = 0;
    int status = 0;
    while (pushed < n && (status = write_locked(r, views[pushed].buf, (uint32_t)views[pushed].len, tag,
                                                deadline, crcs[pushed])) == 0)
        pushed++;
    PyMem_Free(crcs);
    if (status == 1)
        bump(&r->ctr[C_FULL]);
    uint64_t wake_until = wake_until_locked(r);
    unlock(r);
    report(r);
    if (pushed)
        ring_bell(r, wake_until);
    return status < 0 ? -1 : pushed;
}

static PyObject *Ring_push_many(Ring *r, PyObject *const *fast, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"payloads", "tag", "ttl"};
    PyObject *args[3] = {NULL, zero, Py_None};
    if (parse_args("push_many", fast, nargs, kwnames, names, 3, 1, 1, args) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "payloads must be an iterable of bytes-like objects");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0, pushed = -1;
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    if (views == NULL || enter(r) < 0) {
        PyMem_Free(views);
        Py_DECREF(seq);
        return views == NULL ? PyErr_NoMemory() : NULL;
    }
    for (; got < n; got++)
        if (get_payload(PySequence_Fast_GET_ITEM(seq, got), &views[got]) < 0)
            goto done;
    for (Py_ssize_t i = 0; i < n; i++)
        if ((uint64_t)views[i].len > r->record_size) {
            PyErr_Format(PyExc_ValueError, "payload %zd is %zd bytes, more than mailbox %R's record_size %llu", i,
                         views[i].len, r->name, (unsigned long long)r->record_size);
            goto done;
        }
    uint32_t tag;
    uint64_t deadline;
    if (parse_tag(args[1], &tag) < 0 || parse_deadline(r, args[2], &deadline) < 0)
        goto done;
    pushed = push_views(r, views, n, tag, deadline);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_DECREF(seq);
    leave(r);
    return pushed < 0 ? NULL : PyLong_FromSsize_t(pushed);
}

/* ---- consumer side ---- */
static int crc_ok(Ring *r, const slot_t *head, const char *payload) {
    uint32_t c = r->payload_crc ? pbm_crc32(0, payload, head->length) : 0;
    return pbm_crc32(c, (const char *)head + BODY_OFFSET, BODY_BYTES) == head->crc;
}

static void count_torn_locked(Ring *r, uint64_t position) {
    if (!r->torn_count++)
        r->torn_first = position;
    bump(&r->ctr[C_TORN]);
}

/* Takes live records into the batch until it holds b->max; skips (and counts) torn and expired
 * ones. Returns how many it took, or -1 with nothing of the failing record committed. The mutex is held. */
static Py_ssize_t take_locked(Ring *r, batch_t *b, int64_t now) {
    Py_ssize_t k = 0;
    while (b->len < b->max) {
        uint64_t pos = r->ctr[C_READ];
        if (pos >= load_acq(&r->ctr[C_WRITE]))
            break;
        slot_t *s = slot_at(r, pos);
        int expired = s->deadline_ns && s->deadline_ns <= (uint64_t)now;
        /* seq and length here; the crc of a record we take is checked on the copy after unlocking,
         * that of an expired one here (a corrupted deadline must count as torn, not expired) */
        if (load_acq(&s->seq) != pos + 1 || s->length > r->record_size ||
            (expired && !crc_ok(r, s, (char *)s + SLOT_HEADER))) {
            store_rel(&r->ctr[C_READ], pos + 1);
            count_torn_locked(r, pos);
            continue;
        }
        if (expired) {
            store_rel(&r->ctr[C_READ], pos + 1);
            bump(&r->ctr[C_EXPIRED]);
            continue;
        }
        PyObject *payload = NULL;
        if (batch_room(b) == 0) {
            if (b->dest) {  /* into the caller's buffer; payload stays NULL */
                memcpy(b->dest + b->len * (Py_ssize_t)r->record_size, (char *)s + SLOT_HEADER, s->length);
                payload = Py_None;
            } else {
                payload = PyBytes_FromStringAndSize((char *)s + SLOT_HEADER, s->length);
            }
        }
        if (payload == NULL) {
            if (!PyErr_Occurred())
                PyErr_NoMemory();
            if (k)
                PyErr_Clear();
            return k ? k : -1;  /* keep what is taken; the failing record stays on the ring */
        }
        if (r->test_hook != Py_None) {  /* fault injection: the record read, read_index not yet moved */
            PyObject *res = PyObject_CallFunction(r->test_hook, "s", "pop");
            if (res == NULL) {
                if (!b->dest)
                    Py_DECREF(payload);
                return -1;
            }
            Py_DECREF(res);
        }
        taken_t *t = &b->items[b->len++];
        t->payload = b->dest ? NULL : payload;
        memcpy(&t->head, s, sizeof(slot_t));
        store_rel(&r->ctr[C_READ], pos + 1);  /* the commit point */
        k++;
    }
    return k;
}

/* The crc of each record taken into b->items[from..], on its copy: a torn one is dropped, and
 * counted under the mutex again. Returns how many are kept. */
static Py_ssize_t check_taken(Ring *r, batch_t *b, Py_ssize_t from) {
    Py_ssize_t keep = from;
    uint64_t torn_first = 0, torn = 0;
    for (Py_ssize_t i = from; i < b->len; i++) {
        taken_t *t = &b->items[i];
        if (crc_ok(r, &t->head, taken_payload(r, b, i))) {
            if (b->dest && keep != i)  /* close the gap a torn record left in the caller's buffer */
                memmove(taken_payload(r, b, keep), taken_payload(r, b, i), t->head.length);
            b->items[keep++] = *t;
            continue;
        }
        torn_first = torn++ ? torn_first : t->head.seq - 1;
        Py_XDECREF(t->payload);
    }
    b->len = keep;
    if (torn) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (lock_raw(r) == 0) {  /* only EDEADLK or ENOTRECOVERABLE fail: the next call reports those */
            for (uint64_t i = 0; i < torn; i++)
                count_torn_locked(r, torn_first);
            r->torn_first = torn_first;
            unlock(r);
        }
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
        report(r);
    }
    return keep - from;
}

static Py_ssize_t take(Ring *r, batch_t *b, int disarm) {
    for (;;) {  /* again when everything taken turned out torn: more may be there */
        int64_t now;
        if (ttl_now(r, &now) < 0 || lock_live(r) < 0)
            return -1;
        if (disarm && r->ctr[C_SLEEPERS])
            store_rel(&r->ctr[C_SLEEPERS], r->ctr[C_SLEEPERS] - 1);
        disarm = 0;
        Py_ssize_t from = b->len, k = take_locked(r, b, now);
        unlock(r);
        report(r);
        if (k <= 0 || (k = check_taken(r, b, from)) > 0)
            return k;
    }
}

static int looks_empty(Ring *r) { return load_acq(&r->ctr[C_READ]) >= load_acq(&r->ctr[C_WRITE]); }

/* The unlocked peek first: an empty ring costs no lock. */
static Py_ssize_t try_take(Ring *r, batch_t *b) {
    if (!looks_empty(r))
        return take(r, b, 0);
    if (is_live(r))
        return 0;
    PyErr_Format(retired_error, "mailbox %R was recreated or unlinked by another process; attach again", r->name);
    return -1;
}

/* Busy-polls write_index without the GIL until a record shows, `until`, or the handle closes;
 * a sched_yield every SPIN_YIELD_NS lets a producer that shares this core run. Not more often: a
 * yield is a system call during which a record goes unseen (on an idle 2-core VM, yielding every 64
 * polls, ~3 us, gave a 64 B one-way p50 of 5.6-6.5 us, every 4096 polls, ~120 us, 4.9-5.7 us). */
static int poll_ring(Ring *r, int64_t until) {
    Py_BEGIN_ALLOW_THREADS
    int64_t next_yield = sat_add(mono_ns(), SPIN_YIELD_NS);
    for (unsigned i = 1;; i++) {
        if (!looks_empty(r) || is_closed(r) || !is_live(r))
            break;
        cpu_relax();
        if (i % 64 == 0) {
            int64_t now = mono_ns();
            if (now >= until)
                break;
            if (now >= next_yield) {
                sched_yield();
                next_yield = sat_add(now, SPIN_YIELD_NS);
            }
        }
    }
    Py_END_ALLOW_THREADS
    return PyErr_CheckSignals() < 0 || raise_if_closed(r) < 0 ? -1 : 0;
}

/* 1: a record is there already (do not sleep); 0: counted as a sleeper until `until_ns`. */
static int arm_doorbell(Ring *r, int64_t until_ns) {
    if (lock_live(r) < 0)
        return -1;
    int ready = !looks_empty(r);
    if (!ready) {
        bump(&r->ctr[C_SLEEPERS]);
        if ((uint64_t)until_ns > r->ctr[C_WAKE_UNTIL])
            store_rel(&r->ctr[C_WAKE_UNTIL], (uint64_t)until_ns);
    }
    unlock(r);
    report(r);
    return ready;
}

static int disarm_doorbell(Ring *r) {
    if (lock_raw(r) < 0)
        return -1;
    if (r->ctr[C_SLEEPERS])
        store_rel(&r->ctr[C_SLEEPERS], r->ctr[C_SLEEPERS] - 1);
    unlock(r);
    report(r);
    return 0;
}

/* Waits on the doorbell FIFO for up to ns, then empties it. */
static int sleep_on_bell(Ring *r, int64_t ns) {
    struct pollfd p = {r->bell, POLLIN, 0};
    int ms = (int)min64((ns + 999999) / 1000000, 1 << 30), rc, poll_errno;
    char buf[4096];
    Py_BEGIN_ALLOW_THREADS
    rc = poll(&p, 1, ms);
    poll_errno = errno;  /* before the reads below, whose EAGAIN on an empty FIFO would replace an EINTR */
    while (read(r->bell, buf, sizeof buf) == (ssize_t)sizeof buf) {
    }
    Py_END_ALLOW_THREADS
    if (rc < 0 && poll_errno != EINTR) {
        errno = poll_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return PyErr_CheckSignals() < 0 || raise_if_closed(r) < 0 ? -1 : 0;
}

/* Sleeps once on the doorbell (armed under the mutex so no push in between is missed), then
 * disarms and looks in one critical section. */
static Py_ssize_t sleep_and_take(Ring *r, batch_t *b, int64_t now, int64_t wake_at) {
    int ready = arm_doorbell(r, wake_at);
    if (ready)
        return ready < 0 ? -1 : 0;
    if (sleep_on_bell(r, wake_at - now) < 0) {
        PyObject *type, *value, *tb;  /* interrupted: stop being counted as a sleeper */
        PyErr_Fetch(&type, &value, &tb);
        disarm_doorbell(r);
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
        return -1;
    }
    return take(r, b, 1);
}

static Py_ssize_t pop_into(Ring *r, batch_t *b, PyObject *timeout) {
    int wait;
    int64_t give_up;
    if (parse_timeout(timeout, &wait, &give_up) < 0)
        return -1;
    Py_ssize_t k = try_take(r, b);
    if (k != 0 || !wait)
        return k;
    int64_t now = mono_ns();
    int64_t spin_until = r->wait == WAIT_SPIN ? INT64_MAX : r->wait == WAIT_SLEEP ? now : sat_add(now, r->spin_ns);
    for (;;) {
        if ((k = try_take(r, b)) != 0)
            return k;
        if ((now = mono_ns()) >= give_up)
            return 0;
        if (now < spin_until) {
            if (poll_ring(r, min64(min64(give_up, spin_until), sat_add(now, POLL_CHUNK_NS))) < 0)
                return -1;
            continue;
        }
        if ((k = sleep_and_take(r, b, now, min64(give_up, sat_add(now, r->sleep_slice_ns)))) != 0)
            return k;
    }
}

static PyObject *make_record(taken_t *t) {
    PyObject *rec = record_type->tp_alloc(record_type, 7);  /* what tuple.__new__(Record, ...) does */
    if (rec == NULL) {
        Py_DECREF(t->payload);
        return NULL;
    }
    const slot_t *h = &t->head;
    PyObject *items[7] = {t->payload, PyLong_FromUnsignedLong(h->producer),
                          PyLong_FromUnsignedLongLong(h->producer_seq), PyLong_FromUnsignedLong(h->tag), PyLong_FromUnsignedLong(h->pid),
                          PyLong_FromUnsignedLongLong(h->pushed_ns), PyLong_FromUnsignedLongLong(h->deadline_ns)};
    int ok = 1;
    for (int i = 0; i < 7; i++) {
        ok &= items[i] != NULL;
        PyTuple_SET_ITEM(rec, i, items[i]);
    }
    if (!ok) {
        Py_DECREF(rec);
        return NULL;
    }
    return rec;
}

static PyObject *Ring_pop(Ring *r, PyObject *const *fast, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"timeout"};
    PyObject *timeout = Py_None;
    if ((nargs || kwnames) && parse_args("pop", fast, nargs, kwnames, names, 1, 1, 0, &timeout) < 0)
        return NULL;
    if (enter(r) < 0)
        return NULL;
    batch_t b = {.items = &b.one, .cap = 1, .max = 1};
    Py_ssize_t k = pop_into(r, &b, timeout);
    leave(r);
    if (k <= 0)
        return k < 0 ? NULL : Py_NewRef(Py_None);
    return make_record(&b.items[0]);
}

static PyObject *records_list(batch_t *b) {
    PyObject *list = PyList_New(b->len);
    for (Py_ssize_t i = 0; i < b->len; i++) {
        PyObject *rec = list != NULL ? make_record(&b->items[i]) : NULL;
        if (rec == NULL) {
            if (list == NULL)
                Py_DECREF(b->items[i].payload);
            Py_CLEAR(list);
            continue;
        }
        PyList_SET_ITEM(list, i, rec);
    }
    return list;
}

static PyObject *Ring_pop_many(Ring *r, PyObject *const *fast, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"max_records", "timeout"};
    PyObject *args[2] = {NULL, Py_None};
    if (parse_args("pop_many", fast, nargs, kwnames, names, 2, 2, 1, args) < 0)
        return NULL;
    int overflow = 0;
    long long most = PyLong_Check(args[0]) ? PyLong_AsLongLongAndOverflow(args[0], &overflow) : 0;
    if (most == -1 && PyErr_Occurred())
        return NULL;
    if (!PyLong_Check(args[0]) || overflow < 0 || (!overflow && most < 1)) {
        PyErr_Format(PyExc_ValueError, "max_records must be an int >= 1, got %R", args[0]);
        return NULL;
    }
    if (enter(r) < 0)
        return NULL;
    /* no batch is longer than the ring */
    Py_ssize_t max = (overflow || (uint64_t)most > r->capacity) ? (Py_ssize_t)r->capacity : (Py_ssize_t)most;
    batch_t b = {.items = &b.one, .cap = 1, .max = max};
    Py_ssize_t k = pop_into(r, &b, args[1]);
    leave(r);
    for (Py_ssize_t i = 0; k < 0 && i < b.len; i++)  /* a test hook raised: what it had taken goes too */
        Py_DECREF(b.items[i].payload);
    PyObject *list = k < 0 ? NULL : records_list(&b);
    batch_free(&b);
    return list;
}

/* A writable C-contiguous buffer of 4-byte unsigned ints (lengths for pop_into), at least n long. */
static int get_lengths(PyObject *obj, Py_buffer *view, Py_ssize_t n) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    int u32 = view->itemsize == 4 && (strcmp(f, "I") == 0 || (strcmp(f, "L") == 0 && sizeof(long) == 4));
    if (!u32 || view->len / 4 < n) {
        PyErr_Format(PyExc_ValueError, "lengths must be a writable uint32 array of at least %zd items (one per "
                     "record the buffer holds), e.g. numpy.empty(%zd, numpy.uint32)", n, n);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *Ring_pop_into(Ring *r, PyObject *const *fast, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"out", "lengths", "timeout"};
    PyObject *args[3] = {NULL, Py_None, Py_None};
    if (parse_args("pop_into", fast, nargs, kwnames, names, 3, 2, 1, args) < 0)
        return NULL;
    if (enter(r) < 0)
        return NULL;
    Py_buffer out, lengths = {0};
    if (PyObject_GetBuffer(args[0], &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        leave(r);
        return NULL;
    }
    Py_ssize_t rows = out.len / (Py_ssize_t)r->record_size;
    PyObject *result = NULL;
    if (rows < 1) {
        PyErr_Format(PyExc_ValueError, "mailbox %R: out holds %zd bytes, less than one record of record_size %llu; "
                     "give it rows of record_size bytes, e.g. numpy.empty((n, %llu), numpy.uint8)", r->name,
                     out.len, (unsigned long long)r->record_size, (unsigned long long)r->record_size);
        goto done;
    }
    rows = rows > (Py_ssize_t)r->capacity ? (Py_ssize_t)r->capacity : rows;  /* no batch is longer than the ring */
    if (args[1] != Py_None && get_lengths(args[1], &lengths, rows) < 0)
        goto done;
    batch_t b = {.items = &b.one, .cap = 1, .max = rows, .dest = out.buf};
    Py_ssize_t k = pop_into(r, &b, args[2]);
    if (k >= 0 && lengths.buf != NULL)
        for (Py_ssize_t i = 0; i < b.len; i++)
            ((uint32_t *)lengths.buf)[i] = b.items[i].head.length;
    result = k < 0 ? NULL : PyLong_FromSsize_t(b.len);
    batch_free(&b);
    if (lengths.buf != NULL)
        PyBuffer_Release(&lengths);
done:
    PyBuffer_Release(&out);
    leave(r);
    return result;
}

/* ---- doorbell, counters, life cycle ---- */
static PyObject *Ring_arm(Ring *r, PyObject *until) {
    long long until_ns = PyLong_AsLongLong(until);
    if (until_ns == -1 && PyErr_Occurred())
        return NULL;
    if (enter(r) < 0)
        return NULL;
    int ready = arm_doorbell(r, until_ns);
    leave(r);
    return ready < 0 ? NULL : PyBool_FromLong(ready);
}

static PyObject *Ring_disarm(Ring *r, PyObject *unused) {
    if (enter(r) < 0)
        return NULL;
    int rc = disarm_doorbell(r);
    leave(r);
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

static PyObject *Ring_counters(Ring *r, PyObject *unused) {
    if (enter(r) < 0)
        return NULL;
    uint64_t values[N_COUNTERS];
    int rc = lock_raw(r);
    if (rc == 0) {
        memcpy(values, r->ctr, sizeof values);
        unlock(r);
        report(r);
    }
    leave(r);
    if (rc < 0)
        return NULL;
    PyObject *tuple = PyTuple_New(N_COUNTERS);
    for (int i = 0; tuple != NULL && i < N_COUNTERS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(values[i]);
        if (v == NULL)
            Py_CLEAR(tuple);
        else
            PyTuple_SET_ITEM(tuple, i, v);
    }
    return tuple;
}

static PyObject *Ring_retire(Ring *r, PyObject *unused) {
    if (enter(r) < 0)
        return NULL;
    int rc = lock_raw(r);
    if (rc == 0) {
        __atomic_store_n(r->state, STATE_RETIRED, __ATOMIC_RELEASE);
        unlock(r);
        report(r);
    }
    leave(r);
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

static PyObject *Ring_after_fork(Ring *r, PyObject *unused) {
    /* A forked child is another producer; calls in flight in the parent's other threads do not exist here. */
    r->pid = (uint32_t)getpid();
    r->producer = -1;
    r->producer_seq = 0;
    r->busy = 0;
    return Py_NewRef(Py_None);
}

static PyObject *Ring_close(Ring *r, PyObject *unused) {
    __atomic_store_n(&r->closed, 1, __ATOMIC_RELAXED);
    if (r->busy == 0)
        release_mapping(r);
    return Py_NewRef(Py_None);
}

static int Ring_init(Ring *r, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"fd", "size", "name", "record_size", "stride", "capacity", "payload_crc", "bell", "wait",
                         "spin_ns", "sleep_slice_ns", NULL};
    int fd, bell, wait, payload_crc;
    Py_ssize_t size;
    unsigned long long record_size, stride, capacity;
    long long spin_ns, sleep_slice_ns;
    PyObject *name;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inUKKKpiiLL", kw, &fd, &size, &name, &record_size, &stride,
                                     &capacity, &payload_crc, &bell, &wait, &spin_ns, &sleep_slice_ns))
        return -1;
    if (r->base != NULL || record_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, record_type == NULL ? "sage._pbm.configure() was not called"
                                                                : "Ring is initialised once");
        return -1;
    }
    if (capacity < 1 || record_size < 1 || stride < SLOT_HEADER + record_size || size < 0 ||
        (uint64_t)size != HEADER_SIZE + capacity * stride || wait < WAIT_SPIN || wait > WAIT_ADAPTIVE) {
        PyErr_SetString(PyExc_ValueError, "ring geometry does not match the file size");
        return -1;
    }
    void *base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->bell = dup(bell);
    if (r->bell < 0) {
        munmap(base, (size_t)size);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->base = base;
    r->size = (size_t)size;
    r->ctr = (uint64_t *)(r->base + COUNTERS_OFFSET);
    r->state = (uint32_t *)(r->base + STATE_OFFSET);
    r->mutex = (pthread_mutex_t *)(r->base + MUTEX_OFFSET);
    r->record_size = record_size;
    r->stride = stride;
    r->capacity = capacity;
    r->payload_crc = payload_crc;
    r->wait = wait;
    r->spin_ns = spin_ns;
    r->sleep_slice_ns = sleep_slice_ns > 0 ? sleep_slice_ns : 1;
    r->producer = -1;
    r->pid = (uint32_t)getpid();
    Py_XSETREF(r->name, Py_NewRef(name));
    return 0;
}

static PyObject *Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Ring *r = (Ring *)type->tp_alloc(type, 0);
    if (r != NULL) {
        r->bell = -1;
        r->clock = Py_NewRef(Py_None);
        r->test_hook = Py_NewRef(Py_None);
        r->name = PyUnicode_FromString("?");
    }
    return (PyObject *)r;
}

static int Ring_traverse(Ring *r, visitproc visit, void *arg) {
    Py_VISIT(r->clock);
    Py_VISIT(r->test_hook);
    return 0;
}

static int Ring_clear(Ring *r) {
    Py_CLEAR(r->clock);
    Py_CLEAR(r->test_hook);
    return 0;
}

static void Ring_dealloc(Ring *r) {
    PyObject_GC_UnTrack(r);
    release_mapping(r);
    Ring_clear(r);
    Py_CLEAR(r->name);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int set_callable(PyObject **slot, PyObject *value, const char *what) {
    if (value == NULL || (value != Py_None && !PyCallable_Check(value))) {
        PyErr_Format(PyExc_TypeError, "%s must be None or a callable", what);
        return -1;
    }
    Py_XSETREF(*slot, Py_NewRef(value));
    return 0;
}

static PyObject *get_clock(Ring *r, void *c) { return Py_NewRef(r->clock); }
static int set_clock(Ring *r, PyObject *v, void *c) { return set_callable(&r->clock, v, "clock"); }
static PyObject *get_hook(Ring *r, void *c) { return Py_NewRef(r->test_hook); }
static int set_hook(Ring *r, PyObject *v, void *c) { return set_callable(&r->test_hook, v, "test_hook"); }

static PyGetSetDef Ring_getset[] = {
    {"clock", (getter)get_clock, (setter)set_clock, "TTL clock: None (CLOCK_MONOTONIC) or a callable -> ns", NULL},
    {"test_hook", (getter)get_hook, (setter)set_hook, "called as hook('push') / hook('pop') inside the lock", NULL},
    {NULL},
};

static PyMemberDef Ring_members[] = {
    {"producer_seq", T_ULONGLONG, offsetof(Ring, producer_seq), READONLY, "records this handle pushed"},
    {"closed", T_INT, offsetof(Ring, closed), READONLY, "close() was called"},
    {NULL},
};

static PyMethodDef Ring_methods[] = {
    {"push", (PyCFunction)(void (*)(void))Ring_push, METH_FASTCALL | METH_KEYWORDS,
     "push(payload, tag=0, ttl=None, timeout=None) -> PushStatus (sage.mailbox.Mailbox.push)"},
    {"push_many", (PyCFunction)(void (*)(void))Ring_push_many, METH_FASTCALL | METH_KEYWORDS,
     "push_many(payloads, tag=0, ttl=None) -> int (sage.mailbox.Mailbox.push_many)"},
    {"pop", (PyCFunction)(void (*)(void))Ring_pop, METH_FASTCALL | METH_KEYWORDS,
     "pop(timeout=None) -> Record | None (sage.mailbox.Mailbox.pop)"},
    {"pop_many", (PyCFunction)(void (*)(void))Ring_pop_many, METH_FASTCALL | METH_KEYWORDS,
     "pop_many(max_records, timeout=None) -> list[Record] (sage.mailbox.Mailbox.pop_many)"},
    {"pop_into", (PyCFunction)(void (*)(void))Ring_pop_into, METH_FASTCALL | METH_KEYWORDS,
     "pop_into(out, lengths=None, timeout=None) -> int (sage.mailbox.Mailbox.pop_into)"},
    {"arm", (PyCFunction)Ring_arm, METH_O, "arm(until_ns) -> bool: True if a record is there (do not sleep)"},
    {"disarm", (PyCFunction)Ring_disarm, METH_NOARGS, "stop counting as a sleeper"},
    {"counters", (PyCFunction)Ring_counters, METH_NOARGS, "the header's nine u64 counters, read under the lock"},
    {"retire", (PyCFunction)Ring_retire, METH_NOARGS, "mark the ring retired (state 2) under the lock"},
    {"after_fork", (PyCFunction)Ring_after_fork, METH_NOARGS, "in a forked child: a new producer"},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "unmap (once no call of this handle is in flight)"},
    {NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sage._pbm.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One handle's native engine on a PBM ring (see sage.mailbox.Mailbox).",
    .tp_new = Ring_new,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_traverse = (traverseproc)Ring_traverse,
    .tp_clear = (inquiry)Ring_clear,
    .tp_methods = Ring_methods,
    .tp_members = Ring_members,
    .tp_getset = Ring_getset,
};

/* ---- module functions ---- */
static PyObject *configure(PyObject *m, PyObject *args) {
    PyObject *rt, *ok, *full, *too_big, *err, *retired, *w;
    if (!PyArg_ParseTuple(args, "O!OOOOOO:configure", &PyType_Type, &rt, &ok, &full, &too_big, &err, &retired, &w))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)rt, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "the record type must be a tuple subclass (a NamedTuple)");
        return NULL;
    }
    Py_XSETREF(record_type, (PyTypeObject *)Py_NewRef(rt));
    Py_XSETREF(status_ok, Py_NewRef(ok));
    Py_XSETREF(status_full, Py_NewRef(full));
    Py_XSETREF(status_too_big, Py_NewRef(too_big));
    Py_XSETREF(mailbox_error, Py_NewRef(err));
    Py_XSETREF(retired_error, Py_NewRef(retired));
    Py_XSETREF(warn, Py_NewRef(w));
    Py_RETURN_NONE;
}

/* Initialises the robust, process-shared, error-checking mutex at `offset` of a writable buffer. */
static PyObject *init_mutex(PyObject *m, PyObject *args) {
    Py_buffer view;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "w*n:init_mutex", &view, &offset))
        return NULL;
    int rc = EINVAL;
    if (offset >= 0 && offset + MUTEX_BYTES <= view.len && offset % 8 == 0) {
        pthread_mutexattr_t attr;
        pthread_mutexattr_init(&attr);
        pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
        memset((char *)view.buf + offset, 0, MUTEX_BYTES);
        rc = pthread_mutex_init((pthread_mutex_t *)((char *)view.buf + offset), &attr);
        pthread_mutexattr_destroy(&attr);
    }
    PyBuffer_Release(&view);
    if (rc) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *crc32_common(PyObject *args, uint32_t (*fn)(uint32_t, const void *, size_t)) {
    Py_buffer view;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &view, &value))
        return NULL;
    uint32_t c;
    Py_BEGIN_ALLOW_THREADS
    c = fn(value, view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

static PyObject *crc32_fn(PyObject *m, PyObject *args) { return crc32_common(args, pbm_crc32); }
static PyObject *crc32_portable_fn(PyObject *m, PyObject *args) { return crc32_common(args, pbm_crc32_portable); }

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS, "configure(Record, OK, FULL, TOO_BIG, MailboxError, RetiredError, warn)"},
    {"init_mutex", init_mutex, METH_VARARGS, "init_mutex(writable_buffer, offset): a robust process-shared mutex"},
    {"crc32", crc32_fn, METH_VARARGS, "crc32(data, value=0): zlib.crc32, on the fastest path this CPU has"},
    {"crc32_portable", crc32_portable_fn, METH_VARARGS, "crc32_portable(data, value=0): the table path only"},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sage._pbm", "Native engine of the PBM ring.", -1,
                                    module_methods};

PyMODINIT_FUNC PyInit__pbm(void) {
    pbm_crc32_init();
    zero = PyLong_FromLong(0);
    if (zero == NULL)
        return NULL;
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddIntConstant(m, "LAYOUT_VERSION", LAYOUT_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_HEADER", SLOT_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "COUNTERS_OFFSET", COUNTERS_OFFSET) < 0 ||
        PyModule_AddIntConstant(m, "MUTEX_OFFSET", MUTEX_OFFSET) < 0 ||
        PyModule_AddIntConstant(m, "MUTEX_BYTES", MUTEX_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t)) < 0 ||
        PyModule_AddIntConstant(m, "WAIT_SPIN", WAIT_SPIN) < 0 ||
        PyModule_AddIntConstant(m, "WAIT_SLEEP", WAIT_SLEEP) < 0 ||
        PyModule_AddIntConstant(m, "WAIT_ADAPTIVE", WAIT_ADAPTIVE) < 0 ||
        PyModule_AddStringConstant(m, "CRC32_IMPL", pbm_crc32_impl()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
