/*
 * A power cut for one process, for tests/power_loss.rs: loaded into `tsa serve` with
 * LD_PRELOAD, it keeps, for every regular file, what each write since the file's last
 * fsync/fdatasync overwrote (an undo log). When the file named by TSA_POWER_CUT appears, it
 * stops every write, puts each file back as it was at its last sync (the newest writes
 * undone first), and ends the process with _exit(137): what the disk holds after a power
 * loss that took the page cache with it, as far as file contents go. Metadata (creating,
 * renaming, removing files) and SQLite's wal-index (`*-shm`, mapped into memory and rebuilt
 * from the log) are left as they are.
 *
 * With TSA_SYNC_FAIL it also fails the token log's syncs on demand (`sync_fails`).
 *
 * Every write, truncate and sync of a regular file runs under one lock, with the undo log
 * updated in the same step, so the log always matches the files; other descriptors (sockets,
 * pipes) pass straight through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* One write (or truncate) since its file's last sync: the file's size before it, and the
 * octets at [offset, offset + len) before it, where the file had any. */
struct undo {
	dev_t dev;
	ino_t ino;
	char path[PATH_MAX];
	off_t size_before;
	off_t offset;
	size_t len;
	char *old;
	struct undo *next; /* the one before it */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct undo *newest;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);

static void *next_symbol(const char *name)
{
	void *f = dlsym(RTLD_NEXT, name);
	if (!f)
		abort();
	return f;
}

/* Notes what [offset, offset + len) of the regular file `fd` holds before it is written (or
 * truncated, with len the octets cut off). */
static void note(int fd, off_t offset, size_t len)
{
	struct stat st;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
		return;
	struct undo *u = calloc(1, sizeof *u);
	if (!u)
		abort();
	u->dev = st.st_dev;
	u->ino = st.st_ino;
	char link[64];
	snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(link, u->path, sizeof u->path - 1);
	u->path[n > 0 ? n : 0] = '\0';
	if (n >= 4 && strcmp(u->path + n - 4, "-shm") == 0) {
		/* SQLite's wal-index: mapped into memory, where undoing its growth would
		 * leave the threads still reading it past its end (SIGBUS); SQLite rebuilds it
		 * from the log anyway. */
		free(u);
		return;
	}
	u->size_before = st.st_size;
	u->offset = offset;
	if (offset < st.st_size) {
		size_t have = (size_t)(st.st_size - offset);
		u->len = len < have ? len : have;
		u->old = malloc(u->len ? u->len : 1);
		if (!u->old)
			abort();
		ssize_t got = pread(fd, u->old, u->len, offset);
		if (got < 0 && errno == EBADF) {
			/* Opened for writing only: read the old octets through a descriptor of
			 * our own. */
			int reader = open(u->path, O_RDONLY);
			got = reader < 0 ? -1 : pread(reader, u->old, u->len, offset);
			if (reader >= 0)
				close(reader);
		}
		u->len = got > 0 ? (size_t)got : 0;
	}
	u->next = newest;
	newest = u;
}

/* Forgets the undo of the file of `fd`: its writes are durable, or (`restore`) are undone
 * here first, newest first, putting the file back as it was at its last sync. */
static void forget(int fd, int restore)
{
	struct stat st;
	if (fstat(fd, &st) != 0)
		return;
	for (struct undo **p = &newest; *p;) {
		struct undo *u = *p;
		if (u->dev == st.st_dev && u->ino == st.st_ino) {
			if (restore) {
				real_ftruncate(fd, u->size_before);
				if (u->len)
					real_pwrite(fd, u->old, u->len, u->offset);
			}
			*p = u->next;
			free(u->old);
			free(u);
		} else {
			p = &u->next;
		}
	}
}

static int regular(int fd)
{
	struct stat st;
	return fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

static off_t position(int fd)
{
	if (fcntl(fd, F_GETFL) & O_APPEND) {
		struct stat st;
		return fstat(fd, &st) == 0 ? st.st_size : 0;
	}
	off_t at = lseek(fd, 0, SEEK_CUR);
	return at < 0 ? 0 : at;
}

static size_t total(const struct iovec *iov, int n)
{
	size_t sum = 0;
	for (int i = 0; i < n; i++)
		sum += iov[i].iov_len;
	return sum;
}

ssize_t write(int fd, const void *buf, size_t len)
{
	if (!regular(fd))
		return real_write(fd, buf, len);
	pthread_mutex_lock(&lock);
	note(fd, position(fd), len);
	ssize_t r = real_write(fd, buf, len);
	pthread_mutex_unlock(&lock);
	return r;
}

static ssize_t pwrite_with(ssize_t (*real)(int, const void *, size_t, off_t), int fd,
			   const void *buf, size_t len, off_t offset)
{
	if (!regular(fd))
		return real(fd, buf, len, offset);
	pthread_mutex_lock(&lock);
	note(fd, offset, len);
	ssize_t r = real(fd, buf, len, offset);
	pthread_mutex_unlock(&lock);
	return r;
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t offset)
{
	return pwrite_with(real_pwrite, fd, buf, len, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t offset)
{
	return pwrite_with(real_pwrite64, fd, buf, len, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int n)
{
	if (!regular(fd))
		return real_writev(fd, iov, n);
	pthread_mutex_lock(&lock);
	note(fd, position(fd), total(iov, n));
	ssize_t r = real_writev(fd, iov, n);
	pthread_mutex_unlock(&lock);
	return r;
}

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t offset)
{
	if (!regular(fd))
		return real_pwritev(fd, iov, n, offset);
	pthread_mutex_lock(&lock);
	note(fd, offset, total(iov, n));
	ssize_t r = real_pwritev(fd, iov, n, offset);
	pthread_mutex_unlock(&lock);
	return r;
}

static int truncate_with(int (*real)(int, off_t), int fd, off_t length)
{
	pthread_mutex_lock(&lock);
	struct stat st;
	if (fstat(fd, &st) == 0 && length < st.st_size)
		note(fd, length, (size_t)(st.st_size - length));
	else
		note(fd, length, 0);
	int r = real(fd, length);
	pthread_mutex_unlock(&lock);
	return r;
}

int ftruncate(int fd, off_t length)
{
	return truncate_with(real_ftruncate, fd, length);
}

int ftruncate64(int fd, off_t length)
{
	return truncate_with(real_ftruncate64, fd, length);
}

/* TSA_SYNC_FAIL: while the file it names exists, an fdatasync of a file of the token log
 * fails with EIO, and the writes since the file's last sync are undone: the worst a disk's
 * write error can leave (the kernel may mark the pages clean without having written them, so
 * no later sync writes them, and they are gone once the page cache is). An fsync still works:
 * a disk whose data writes fail while its metadata (a cut's new size) goes through, and the
 * kernel reports a writeback error once, so a later sync of the same file can succeed. */
static const char *sync_fail;

static int sync_fails(int fd)
{
	if (!sync_fail || access(sync_fail, F_OK) != 0)
		return 0;
	char link[64], path[PATH_MAX];
	snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(link, path, sizeof path - 1);
	if (n < 0)
		return 0;
	path[n] = 0;
	return strstr(path, "/archive.tokens/") != NULL;
}

static int sync_with(int (*real)(int), int fd)
{
	if (real == real_fdatasync && sync_fails(fd)) {
		pthread_mutex_lock(&lock);
		forget(fd, 1);
		pthread_mutex_unlock(&lock);
		errno = EIO;
		return -1;
	}
	pthread_mutex_lock(&lock);
	int r = real(fd);
	if (r == 0)
		forget(fd, 0);
	pthread_mutex_unlock(&lock);
	return r;
}

int fsync(int fd)
{
	return sync_with(real_fsync, fd);
}

int fdatasync(int fd)
{
	return sync_with(real_fdatasync, fd);
}

/* The power cut: every file back to its last sync, newest write first, then the end. */
static void cut(void)
{
	pthread_mutex_lock(&lock);
	for (struct undo *u = newest; u; u = u->next) {
		int fd = open(u->path, O_WRONLY);
		if (fd < 0)
			continue; /* removed since: nothing left to undo */
		struct stat st;
		if (fstat(fd, &st) == 0 && st.st_dev == u->dev && st.st_ino == u->ino) {
			real_ftruncate(fd, u->size_before);
			if (u->len)
				real_pwrite(fd, u->old, u->len, u->offset);
		}
		close(fd);
	}
	_exit(137);
}

static void *watch(void *trigger)
{
	struct timespec pause = {0, 2 * 1000 * 1000};
	for (;;) {
		if (access((const char *)trigger, F_OK) == 0)
			cut();
		nanosleep(&pause, NULL);
	}
	return NULL;
}

__attribute__((constructor)) static void start(void)
{
	real_write = next_symbol("write");
	real_pwrite = next_symbol("pwrite");
	real_pwrite64 = next_symbol("pwrite64");
	real_writev = next_symbol("writev");
	real_pwritev = next_symbol("pwritev");
	real_ftruncate = next_symbol("ftruncate");
	real_ftruncate64 = next_symbol("ftruncate64");
	real_fsync = next_symbol("fsync");
	real_fdatasync = next_symbol("fdatasync");
	sync_fail = getenv("TSA_SYNC_FAIL");
	const char *trigger = getenv("TSA_POWER_CUT");
	if (!trigger)
		return;
	pthread_t thread;
	pthread_create(&thread, NULL, watch, strdup(trigger));
	pthread_detach(thread);
}
