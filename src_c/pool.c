/* foldnorm's thread pool (see pool.h and fn_pool.h).
 *
 * One region runs at a time.  Its state is one atomic word, (generation << 32) | open | active workers: the
 * caller publishes a region by storing the next generation, open; a worker joins by adding itself to the
 * active count while the region is open, the generation is the one it saw and fewer than the region's limit
 * are in; the caller closes the region when its own part is done (every loop finished), then waits for the
 * workers still inside to leave, which only takes them the time to see that their loops are done.  A worker
 * that is not scheduled until after the close never joins, so nothing waits for it.
 *
 * Between regions a worker spins for FN_POOL_SPIN_NS, or until it finds it was descheduled, then sleeps on a
 * condition variable, which a caller signals only when a worker sleeps.  While the machine has a core for
 * every runnable thread it spins on, up to FN_POOL_IDLE_SPIN_NS: waking a sleeping thread costs tens of
 * microseconds (more on a virtual machine, whose idle virtual CPU the host must schedule again), and a spin
 * then takes time from nobody.  It looks at the machine as it spins, so a thread that would have to wait
 * for a core ends the spin within a look or two (FN_POOL_IDLE_CHECK_NS apart).
 */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>
#if defined(__linux__)
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define FN_POOL_MAX_WORKERS (FN_TEAM_MAX_THREADS - 1)
/* A worker looks for the next region this long after one before it sleeps: long enough that calls made
 * back to back from Python (microseconds apart) find it awake.  It sleeps at once when it finds that it was
 * descheduled while it looked (two looks further apart than FN_POOL_PREEMPTED_NS: another thread had its
 * core for a time slice; a virtual machine's own stalls of a spinning thread, several every 20 ms on this
 * project's VM, last 20 to 100 us): the machine is busy, a spinning thread only takes time from other
 * processes there, and a thread that sleeps between calls is the one the scheduler runs promptly when it is
 * woken. */
#define FN_POOL_SPIN_NS 50000
#define FN_POOL_PREEMPTED_NS 200000
/* Past FN_POOL_SPIN_NS a worker spins on while no runnable thread on the machine lacks a core (the count of
 * runnable threads, /proc/loadavg's fourth field, which the kernel sums from the run queues when it is read:
 * no average, no lag), first FN_POOL_FIRST_LOOK_NS after the region, then every FN_POOL_IDLE_CHECK_NS (a
 * read costs about a microsecond); see fn_pool_next_region for when a look sends it to sleep.
 * Only where the process may run on every online core, since the count is the machine's.  As long as
 * OpenMP runtimes spin by default (libgomp about 15 ms here, Intel's 200 ms), so that a loop calling the
 * kernels every few milliseconds finds its workers awake. */
#define FN_POOL_IDLE_SPIN_NS 20000000
#define FN_POOL_IDLE_CHECK_NS 20000
#define FN_POOL_FIRST_LOOK_NS 10000
/* A caller that waits longer than FN_POOL_PREEMPTED_WAIT_NS for workers (a chunk takes microseconds, so
 * the worker was preempted) runs the calls of the next FN_POOL_SOLO_NS alone; so does one that waits longer
 * than FN_POOL_BUSY_WAIT_NS while the machine has more runnable threads than cores.  (A quiet virtual
 * machine stalls a virtual CPU for a few hundred microseconds now and then: that alone is no reason.) */
#define FN_POOL_PREEMPTED_WAIT_NS 1000000
#define FN_POOL_BUSY_WAIT_NS 200000
/* The solo time doubles, up to FN_POOL_SOLO_MAX_NS, each time the first team call after it waits again, so
 * that a machine that stays busy sees few team calls; a call in solo time that finds a core for every
 * runnable thread ends it at once (where the count is known), so a machine that turns quiet gets its team
 * back on the next call. */
#define FN_POOL_SOLO_NS 20000000
#define FN_POOL_SOLO_MAX_NS 640000000

#define FN_STATE_OPEN ((uint64_t)1 << 31)
#define FN_STATE_ACTIVE ((uint64_t)FN_STATE_OPEN - 1)

static struct {
    _Atomic uint64_t state;
    atomic_int limit;   /* workers the open region takes at most */
    atomic_int hold;    /* tests: workers join nothing */
    atomic_int sleepers;
    atomic_int departures;     /* workers that left a region: the futex a closing caller sleeps on */
    atomic_int caller_waiting; /* a closing caller sleeps until the workers inside have left */
    atomic_llong spin_ns;      /* FN_POOL_SPIN_NS unless a benchmark changes it */
    atomic_llong idle_spin_ns; /* FN_POOL_IDLE_SPIN_NS unless a benchmark changes it */
    atomic_llong solo_until_ns; /* calls before this time (CLOCK_MONOTONIC) run alone */
    atomic_llong solo_ns;       /* the last solo time; FN_POOL_SOLO_NS to FN_POOL_SOLO_MAX_NS */
    atomic_int loadavg_fd;      /* /proc/loadavg, opened at the first look; -2: not yet, -1: none here */
    atomic_int online_cpus;     /* stored before loadavg_fd (by every thread that opens it: the same value) */
    atomic_flag busy;   /* a region is being run */
    /* The open region, written before its generation is published and read only by joined workers. */
    fn_region region;
    void *arg;
    int workers; /* started; changed only by the thread holding busy */
    int fork_handler;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_llong stats[FN_POOL_STAT_COUNT];
} fn_pool = {
    .spin_ns = FN_POOL_SPIN_NS,
    .idle_spin_ns = FN_POOL_IDLE_SPIN_NS,
    .loadavg_fd = -2,
    .busy = ATOMIC_FLAG_INIT,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
};

static fn_team fn_pool_team;

/* Sleeps while *word == value (at most briefly where there is no futex); wakes such sleepers. */
static void fn_pool_futex_wait(atomic_int *word, int value)
{
#if defined(__linux__)
    syscall(SYS_futex, (int *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
#else
    (void)word;
    (void)value;
    sched_yield();
#endif
}

static void fn_pool_futex_wake(atomic_int *word)
{
#if defined(__linux__)
    syscall(SYS_futex, (int *)word, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)word;
#endif
}

static long long fn_elapsed_ns(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)(t.tv_sec - t0->tv_sec) * 1000000000LL + (t.tv_nsec - t0->tv_nsec);
}

/* Opens /proc/loadavg once, where the process may use every online core (a count of the machine's
 * runnable threads says nothing about a subset of its cores); -1 where not. */
static int fn_pool_loadavg_open(void)
{
#if defined(__linux__)
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t allowed;
    if (online < 1 || sched_getaffinity(0, sizeof allowed, &allowed) != 0 || CPU_COUNT(&allowed) != online)
        return -1;
    atomic_store_explicit(&fn_pool.online_cpus, (int)online, memory_order_relaxed);
    return open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
#else
    return -1;
#endif
}

/* 1 when every runnable thread on the machine has a core now (this one among them), 0 when some thread
 * waits for one, -1 when the count is unknown here. */
static int fn_pool_machine_state(void)
{
#if defined(__linux__)
    int fd = atomic_load_explicit(&fn_pool.loadavg_fd, memory_order_acquire);
    if (fd == -2) {
        const int opened = fn_pool_loadavg_open();
        int expected = -2;
        if (atomic_compare_exchange_strong(&fn_pool.loadavg_fd, &expected, opened))
            fd = opened;
        else {
            if (opened >= 0)
                close(opened);
            fd = expected;
        }
    }
    if (fd < 0)
        return -1;
    char text[128];
    const ssize_t n = pread(fd, text, sizeof text - 1, 0);
    if (n <= 0)
        return -1;
    text[n] = '\0';
    /* "0.52 0.58 0.59 2/117 4321": the runnable threads before the slash. */
    const char *p = text;
    for (int fields = 0; fields < 3; fields++) {
        while (*p && *p != ' ')
            p++;
        while (*p == ' ')
            p++;
    }
    if (*p < '0' || *p > '9')
        return -1;
    long runnable = 0;
    while (*p >= '0' && *p <= '9' && runnable < 1000000)
        runnable = runnable * 10 + (*p++ - '0');
    if (*p != '/')
        return -1;
    return runnable <= atomic_load_explicit(&fn_pool.online_cpus, memory_order_relaxed);
#else
    return -1;
#endif
}

/* The state once its generation differs from seen: spinning first, then asleep. */
static uint64_t fn_pool_next_region(uint64_t seen)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long long last = 0, checked = FN_POOL_FIRST_LOOK_NS - FN_POOL_IDLE_CHECK_NS;
    int busy_looks = 0;
    const long long spin_ns = atomic_load_explicit(&fn_pool.spin_ns, memory_order_relaxed);
    const long long idle_spin_ns = atomic_load_explicit(&fn_pool.idle_spin_ns, memory_order_relaxed);
    for (unsigned i = 1;; i++) {
        uint64_t s = atomic_load_explicit(&fn_pool.state, memory_order_acquire);
        if (s >> 32 != seen)
            return s;
        if (i % 16 != 0) {
            fn_cpu_relax();
            continue;
        }
        const long long ns = fn_elapsed_ns(&t0);
        if (ns - last > FN_POOL_PREEMPTED_NS) {
            atomic_fetch_add_explicit(&fn_pool.stats[7], 1, memory_order_relaxed);
            break;
        }
        last = ns;
        if (ns - checked >= FN_POOL_IDLE_CHECK_NS) {
            /* Within the short spin one look that finds a thread waiting for a core ends it: that thread
             * has a better use for the core than waiting for a call that may come.  Past it, two looks in
             * a row must (one can catch a kernel thread's moment). */
            const int state = fn_pool_machine_state();
            busy_looks = state == 0 ? busy_looks + 1 : 0;
            if (busy_looks >= (ns <= spin_ns ? 1 : 2)) {
                atomic_fetch_add_explicit(&fn_pool.stats[7], 1, memory_order_relaxed);
                break;
            }
            if (state < 0 && ns > spin_ns)
                break;
            checked = fn_elapsed_ns(&t0);
            last = checked;
        }
        if (ns <= spin_ns)
            continue;
        if (ns > idle_spin_ns) {
            if (idle_spin_ns > spin_ns)
                atomic_fetch_add_explicit(&fn_pool.stats[8], 1, memory_order_relaxed);
            break;
        }
    }
    /* The sleeper count and the state are sequentially consistent on both sides: either this worker sees
     * the new generation, or the caller that published it sees the sleeper and signals under the lock. */
    pthread_mutex_lock(&fn_pool.lock);
    atomic_fetch_add(&fn_pool.sleepers, 1);
    uint64_t s;
    while ((s = atomic_load(&fn_pool.state)) >> 32 == seen)
        pthread_cond_wait(&fn_pool.wake, &fn_pool.lock);
    atomic_fetch_sub(&fn_pool.sleepers, 1);
    pthread_mutex_unlock(&fn_pool.lock);
    return s;
}

/* Joins the region of state s if it is still open and has room: this worker's place in the team (1 for the
 * first to join), or 0 when it is not inside. */
static int fn_pool_join(uint64_t s)
{
    const uint64_t generation = s >> 32;
    while ((s & FN_STATE_OPEN) && s >> 32 == generation && !atomic_load_explicit(&fn_pool.hold, memory_order_relaxed)
           && (int)(s & FN_STATE_ACTIVE) < atomic_load_explicit(&fn_pool.limit, memory_order_relaxed)) {
        if (atomic_compare_exchange_weak_explicit(&fn_pool.state, &s, s + 1, memory_order_acquire,
                                                  memory_order_acquire))
            return (int)(s & FN_STATE_ACTIVE) + 1;
    }
    return 0;
}

static void *fn_pool_worker(void *start_generation)
{
    uint64_t seen = (uint64_t)(uintptr_t)start_generation;
    for (;;) {
        const uint64_t s = fn_pool_next_region(seen);
        seen = s >> 32;
        const int index = fn_pool_join(s);
        if (index == 0)
            continue;
        fn_worker w = {&fn_pool_team, 0, 0, 0, 0, index};
        fn_pool.region(&w, fn_pool.arg);
        atomic_fetch_add_explicit(&fn_pool.stats[3], w.units, memory_order_relaxed);
        atomic_fetch_sub(&fn_pool.state, 1);
        atomic_fetch_add(&fn_pool.departures, 1);
        if (atomic_load(&fn_pool.caller_waiting))
            fn_pool_futex_wake(&fn_pool.departures);
    }
    return NULL;
}

/* A forked child has none of its parent's workers: it starts its own when it needs them. */
static void fn_pool_after_fork(void)
{
    atomic_store(&fn_pool.state, 0);
    atomic_store(&fn_pool.sleepers, 0);
    atomic_store(&fn_pool.caller_waiting, 0);
    atomic_flag_clear(&fn_pool.busy);
    fn_pool.workers = 0;
    pthread_mutex_init(&fn_pool.lock, NULL);
    pthread_cond_init(&fn_pool.wake, NULL);
}

/* Starts workers until there are `want` (fewer if the system refuses threads).  Workers block every
 * signal, which then reach the threads that expect them (Python's main thread). */
static void fn_pool_start_workers(int want)
{
    if (fn_pool.workers >= want)
        return;
    if (!fn_pool.fork_handler)
        fn_pool.fork_handler = pthread_atfork(NULL, NULL, fn_pool_after_fork) == 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const uintptr_t generation = (uintptr_t)(atomic_load(&fn_pool.state) >> 32);
    while (fn_pool.workers < want) {
        pthread_t thread;
        if (pthread_create(&thread, &attr, fn_pool_worker, (void *)generation) != 0)
            break;
        fn_pool.workers++;
        atomic_fetch_add_explicit(&fn_pool.stats[4], 1, memory_order_relaxed);
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

void fn_pool_run(int num_threads, fn_region region, void *arg)
{
    fn_worker w = {NULL, 0, 1, 0, 0, 0};
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    const long long now_ns = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
    int solo = 0;
    if (num_threads >= 2) {
        long long until = atomic_load_explicit(&fn_pool.solo_until_ns, memory_order_relaxed);
        if (now_ns < until) {
            solo = fn_pool_machine_state() != 1;
            if (!solo) /* quiet again: the team is back, and the solo time starts over */
                atomic_compare_exchange_strong(&fn_pool.solo_until_ns, &until, 0);
        }
    }
    if (num_threads < 2 || solo || atomic_flag_test_and_set_explicit(&fn_pool.busy, memory_order_acquire)) {
        if (num_threads >= 2)
            atomic_fetch_add_explicit(&fn_pool.stats[solo ? 5 : 1], 1, memory_order_relaxed);
        region(&w, arg);
        atomic_fetch_add_explicit(&fn_pool.stats[2], w.units, memory_order_relaxed);
        return;
    }
    const int want = num_threads - 1 < FN_POOL_MAX_WORKERS ? num_threads - 1 : FN_POOL_MAX_WORKERS;
    fn_pool_start_workers(want);
    fn_team *team = &fn_pool_team;
    team->threads = num_threads < FN_TEAM_MAX_THREADS ? num_threads : FN_TEAM_MAX_THREADS;
    for (int k = 0; k < FN_TEAM_MAX_LOOPS; k++) {
        for (int r = 0; r < team->threads; r++)
            atomic_store_explicit(&team->loops[k].ranges[r].claimed, 0, memory_order_relaxed);
        atomic_store_explicit(&team->loops[k].done, 0, memory_order_relaxed);
        atomic_store_explicit(&team->loops[k].finished, 0, memory_order_relaxed);
        atomic_store_explicit(&team->loops[k].sleepers, 0, memory_order_relaxed);
    }
    fn_pool.region = region;
    fn_pool.arg = arg;
    atomic_store_explicit(&fn_pool.limit, want < fn_pool.workers ? want : fn_pool.workers, memory_order_relaxed);
    const uint64_t generation = (atomic_load_explicit(&fn_pool.state, memory_order_relaxed) >> 32) + 1;
    atomic_store(&fn_pool.state, generation << 32 | FN_STATE_OPEN);
    if (atomic_load(&fn_pool.sleepers) > 0) {
        pthread_mutex_lock(&fn_pool.lock);
        pthread_cond_broadcast(&fn_pool.wake);
        pthread_mutex_unlock(&fn_pool.lock);
    }

    w.team = team;
    region(&w, arg);

    /* Closed: no worker joins from now on; those inside only have to see that their loops are done. */
    uint64_t s = atomic_load_explicit(&fn_pool.state, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(&fn_pool.state, &s, s & ~FN_STATE_OPEN, memory_order_acq_rel,
                                                  memory_order_relaxed))
        ;
    for (unsigned spins = 0; spins < FN_WAIT_SPINS; spins++) {
        if (!(atomic_load_explicit(&fn_pool.state, memory_order_acquire) & FN_STATE_ACTIVE))
            break;
        fn_cpu_relax();
    }
    /* Asleep, as fn_loop_sleep: either a leaving worker sees caller_waiting, or this sees it gone. */
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        const int departures = atomic_load(&fn_pool.departures);
        atomic_store(&fn_pool.caller_waiting, 1);
        if (!(atomic_load(&fn_pool.state) & FN_STATE_ACTIVE))
            break;
        fn_pool_futex_wait(&fn_pool.departures, departures);
    }
    atomic_store(&fn_pool.caller_waiting, 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    w.slept_ns += (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    /* A caller that slept this long (or a fifth of it while threads wait for cores) waited for a worker
     * the operating system had preempted: the machine is busy.  The calls of the solo time run on their
     * calling threads alone, where no descheduled worker can hold them up; the first call after it, or the
     * first that finds a core for every runnable thread, tries the team again. */
    if (w.slept_ns > FN_POOL_PREEMPTED_WAIT_NS
        || (w.slept_ns > FN_POOL_BUSY_WAIT_NS && fn_pool_machine_state() == 0)) {
        /* A wait in the first team call after a solo time that ran to its end doubles it. */
        const long long last = atomic_load_explicit(&fn_pool.solo_ns, memory_order_relaxed);
        const long long ended = atomic_load_explicit(&fn_pool.solo_until_ns, memory_order_relaxed);
        long long solo_ns = FN_POOL_SOLO_NS;
        if (ended > 0 && last > 0 && now_ns - ended < last)
            solo_ns = 2 * last < FN_POOL_SOLO_MAX_NS ? 2 * last : FN_POOL_SOLO_MAX_NS;
        atomic_store_explicit(&fn_pool.solo_ns, solo_ns, memory_order_relaxed);
        atomic_store_explicit(&fn_pool.solo_until_ns, now_ns + solo_ns, memory_order_relaxed);
        atomic_fetch_add_explicit(&fn_pool.stats[6], 1, memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&fn_pool.stats[0], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&fn_pool.stats[2], w.units, memory_order_relaxed);
    atomic_flag_clear_explicit(&fn_pool.busy, memory_order_release);
}

void fn_pool_stats(long long out[FN_POOL_STAT_COUNT])
{
    for (int k = 0; k < FN_POOL_STAT_COUNT; k++)
        out[k] = atomic_load_explicit(&fn_pool.stats[k], memory_order_relaxed);
}

void fn_pool_hold_workers(int held) { atomic_store(&fn_pool.hold, held != 0); }

void fn_pool_set_spin(long long ns, long long idle_ns)
{
    atomic_store(&fn_pool.spin_ns, ns < 0 ? 0 : ns);
    atomic_store(&fn_pool.idle_spin_ns, idle_ns < 0 ? 0 : idle_ns);
}
