/*
 * The kernel's NTP state as a test sets it, for `tsa serve` with `[clock] source = "kernel"`.
 *
 * Loaded with LD_PRELOAD, it answers adjtimex(2) calls that only read (modes 0) from the file
 * named by TSA_TEST_KERNEL_STATE: one line "rc status maxerror_us offset", the return value
 * and the timex fields the kernel source reads (written whole by a rename, so that a read sees
 * one state or the next). Without the variable or the file, and for calls that set anything,
 * the real adjtimex answers. The clock itself is never touched: the time is the system's.
 * esterror is set to maxerror, so that each state written looks like a daemon's update (the
 * kernel source then reads chronyd's correction again); freq and tick are 0. The time the
 * call gives (timex.time) is the system clock's at the call, as the kernel's is.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timex.h>
#include <time.h>

typedef int (*adjtimex_fn)(struct timex *);

static int real_adjtimex(struct timex *buf) {
    adjtimex_fn real = (adjtimex_fn)dlsym(RTLD_NEXT, "adjtimex");
    return real ? real(buf) : -1;
}

int adjtimex(struct timex *buf) {
    const char *path = getenv("TSA_TEST_KERNEL_STATE");
    if (buf->modes != 0 || path == NULL) {
        return real_adjtimex(buf);
    }
    FILE *file = fopen(path, "r");
    if (file == NULL) {
        return real_adjtimex(buf);
    }
    int rc, status;
    long max_error, offset;
    int fields = fscanf(file, "%d %d %ld %ld", &rc, &status, &max_error, &offset);
    fclose(file);
    if (fields != 4) {
        return real_adjtimex(buf);
    }
    memset(buf, 0, sizeof *buf);
    buf->status = status;
    buf->maxerror = max_error;
    buf->esterror = max_error;
    buf->offset = offset;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    buf->time.tv_sec = now.tv_sec;
    buf->time.tv_usec = (status & STA_NANO) ? now.tv_nsec : now.tv_nsec / 1000;
    return rc;
}
