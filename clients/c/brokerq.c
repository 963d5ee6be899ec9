/* brokerq.c - see brokerq.h. Section numbers (§) are docs/protocol.md's. */
#if defined(__linux__)
#define _GNU_SOURCE             /* struct ucred, flock(), with -std=c99 */
#endif
#include "brokerq.h"
#include "mp.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define SUN_MAX (sizeof(((struct sockaddr_un *)0)->sun_path) - 1) /* 107 on Linux (§10.1) */
#define HELLO_LIMIT 65536       /* the frame limit before the hello reply (§3) */

struct bq {
    int fd;                     /* -1 once the connection is gone */
    int eof;                    /* the broker closed the stream */
    double grace;               /* bq_open's timeout */
    uint64_t next_id;
    uint32_t max_frame;
    long pid;
    char path[SUN_MAX + 1];
    char code[32];
    char message[512];
};

/* A decoded reply; its str/bin fields point into frame. */
enum { F_ID = 1, F_MSG_ID = 2, F_ATTEMPT = 4, F_PID = 8, F_FRAME = 16, F_LEASE = 32, F_BODY = 64 };
struct reply {
    uint8_t *frame;
    unsigned have;              /* F_* bits of the fields present */
    mp_obj op, code, message, body;
    uint64_t id, msg_id, attempt, pid, max_frame;
    double lease;
};

static int fail(bq *b, const char *code, const char *fmt, ...)
{
    va_list ap;
    snprintf(b->code, sizeof b->code, "%s", code);
    va_start(ap, fmt);
    vsnprintf(b->message, sizeof b->message, fmt, ap);
    va_end(ap);
    return -1;
}

/* The connection can no longer be trusted (EOF, timeout, garbage): drop it. */
static int broken(bq *b, const char *code, const char *fmt, const char *what)
{
    if (b->fd >= 0)
        close(b->fd);
    b->fd = -1;
    return fail(b, code, fmt, what);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void nap(double s)
{
    struct timespec t = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&t, &t) && errno == EINTR)
        ;
}

/* ---- paths (§10.1, §10.2) ---- */

/* p made absolute against the cwd, with "." "..", "//" removed as Python's
 * os.path.abspath does, so both clients hand the broker the same string. */
static int absolute(const char *p, char *out, size_t n)
{
    char buf[PATH_MAX * 2];
    char cwd[PATH_MAX];
    if (p[0] == '/')
        snprintf(buf, sizeof buf, "%s", p);
    else if (getcwd(cwd, sizeof cwd))
        snprintf(buf, sizeof buf, "%s/%s", cwd, p);
    else
        return -1;
    size_t len = 0;
    char *save;
    for (char *seg = strtok_r(buf, "/", &save); seg; seg = strtok_r(NULL, "/", &save)) {
        if (strcmp(seg, ".") == 0)
            continue;
        if (strcmp(seg, "..") == 0) {   /* drop the last component */
            while (len > 0 && out[--len] != '/')
                ;
            continue;
        }
        size_t sl = strlen(seg);
        if (len + 1 + sl + 1 > n)
            return -1;
        out[len++] = '/';
        memcpy(out + len, seg, sl);
        len += sl;
    }
    if (len == 0)
        out[len++] = '/';
    out[len] = '\0';
    return 0;
}

static int private_dir(const char *dir)
{
    struct stat st;
    return lstat(dir, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid()
           && (st.st_mode & 077) == 0;
}

int bq_default_socket(char *out, size_t n)
{
    const char *env = getenv("BROKERQ_SOCKET");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int k;
    if (env && *env)
        k = snprintf(out, n, "%s", env);
    else if (xdg && xdg[0] == '/' && private_dir(xdg)
             && strlen(xdg) + strlen("/brokerq/broker.sock") <= SUN_MAX)
        k = snprintf(out, n, "%s/brokerq/broker.sock", xdg);
    else
        k = snprintf(out, n, "/tmp/brokerq-%lu/broker.sock", (unsigned long)geteuid());
    return k < 0 || (size_t)k >= n ? -1 : 0;
}

/* mkdir the socket's directory and refuse one that is not ours alone. */
static int check_dir(bq *b)
{
    char dir[sizeof b->path];
    snprintf(dir, sizeof dir, "%s", b->path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = '\0';        /* a socket in "/" */
    else
        *slash = '\0';
    if (mkdir(dir, 0700) && errno != EEXIST)
        return fail(b, "path", "cannot create %s: %s", dir, strerror(errno));
    if (!private_dir(dir))      /* never chmod it: someone else may have made it */
        return fail(b, "permission",
                    "unsafe socket directory %s: it must be a directory (not a symlink) "
                    "of uid %lu with mode 0700", dir, (unsigned long)geteuid());
    return 0;
}

/* ---- frames (§3) ---- */

/* Wait until fd is ready for events, up to deadline (< 0: for ever). */
static int wait_fd(int fd, short events, double deadline)
{
    for (;;) {
        int ms = -1;
        if (deadline >= 0) {
            double left = deadline - now();
            if (left <= 0)
                return -1;
            ms = (int)(left * 1000) + 1;
        }
        struct pollfd p = {fd, events, 0};
        int r = poll(&p, 1, ms);
        if (r > 0)
            return 0;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

/* Send (sending) or receive all n bytes of p by the deadline. */
static int io_all(bq *b, uint8_t *p, size_t n, int sending, double deadline)
{
    while (n > 0) {
        /* MSG_NOSIGNAL: a closed connection is an error here, not a SIGPIPE. */
        ssize_t k = sending ? send(b->fd, p, n, MSG_NOSIGNAL) : recv(b->fd, p, n, 0);
        if (k > 0) {
            p += k;
            n -= (size_t)k;
        } else if (k == 0 || errno == EPIPE || errno == ECONNRESET) {
            b->eof = 1;
            return broken(b, "unavailable", "%s", "the broker closed the connection");
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            return broken(b, "unavailable", "connection lost: %s", strerror(errno));
        } else if (wait_fd(b->fd, sending ? POLLOUT : POLLIN, deadline)) {
            return broken(b, "unavailable", "%s", "no reply from the broker in time");
        }
    }
    return 0;
}

/* Start a request frame: room for the length, then the map's op entry.
 * fields counts the entries the caller adds; call() adds the id. */
static void begin(mp_buf *r, const char *op, uint32_t fields)
{
    memset(r, 0, sizeof *r);
    mp_raw(r, "\0\0\0\0", 4);
    mp_map(r, fields + 2);
    mp_str(r, "op");
    mp_str(r, op);
}

/* Record a reply field we know; any other key (or a known one of another
 * type) is skipped, as §3 and §11 require. */
static void store(struct reply *r, const mp_obj *k, const mp_obj *v)
{
    static const char *names[] = {"id", "msg_id", "attempt", "pid", "max_frame_size"};
    uint64_t *ints[] = {&r->id, &r->msg_id, &r->attempt, &r->pid, &r->max_frame};
    for (unsigned i = 0; i < 5; i++)
        if (v->type == MP_INT && !v->neg && mp_is(k, names[i])) {
            *ints[i] = v->u;
            r->have |= 1u << i;     /* F_ID ... F_FRAME */
        }
    if (mp_is(k, "lease") && mp_number(v, &r->lease) == 0)
        r->have |= F_LEASE;
    if (mp_is(k, "body") && v->type == MP_BIN) {
        r->body = *v;
        r->have |= F_BODY;
    }
    if (v->type == MP_STR && mp_is(k, "op"))
        r->op = *v;
    if (v->type == MP_STR && mp_is(k, "code"))
        r->code = *v;
    if (v->type == MP_STR && mp_is(k, "message"))
        r->message = *v;
}

/* Read one frame and decode its map into r (r->frame is malloc'd). */
static int recv_reply(bq *b, struct reply *r, double deadline)
{
    uint8_t pre[4];
    memset(r, 0, sizeof *r);
    if (io_all(b, pre, 4, 0, deadline))
        return -1;
    uint32_t len = (uint32_t)pre[0] << 24 | (uint32_t)pre[1] << 16 | (uint32_t)pre[2] << 8 | pre[3];
    if (len > b->max_frame)
        return broken(b, "protocol", "%s", "the broker sent a frame over the limit");
    if (!(r->frame = malloc(len ? len : 1)))
        return broken(b, "nomem", "%s", "out of memory");
    if (io_all(b, r->frame, len, 0, deadline)) {
        b->eof = 0;             /* the end came inside a frame: not a clean close */
        return -1;
    }
    mp_cur c = {r->frame, r->frame + len};
    mp_obj m, k, v;
    int bad = mp_next(&c, &m) || m.type != MP_MAP;
    for (uint32_t i = 0; !bad && i < m.len; i++) {
        bad = mp_next(&c, &k) || k.type != MP_STR || mp_next(&c, &v);
        if (!bad) {
            store(r, &k, &v);
            bad = mp_skip(&c, &v, 0);
        }
    }
    if (bad || c.p != c.end || r->op.type != MP_STR || !(r->have & F_ID))
        return broken(b, "protocol", "%s", "the broker sent a frame that does not decode");
    return 0;
}

static char *copy_str(const mp_obj *o, char *out, size_t n)
{
    size_t k = o->type == MP_STR ? o->len : 0;
    if (k >= n)
        k = n - 1;
    memcpy(out, o->ptr ? (const char *)o->ptr : "", k);
    out[k] = '\0';
    return out;
}

/* An error reply: its code and message become ours. These codes close the
 * connection (§7), so the fd is dropped too. */
static int error_reply(bq *b, const struct reply *r)
{
    static const char *closing[] = {"bad_frame", "version", "permission", "shutting_down",
                                    "overflow", "busy", NULL};
    copy_str(&r->code, b->code, sizeof b->code);
    copy_str(&r->message, b->message, sizeof b->message);
    if (!b->code[0])
        snprintf(b->code, sizeof b->code, "protocol");
    for (int i = 0; closing[i]; i++)
        if (strcmp(b->code, closing[i]) == 0 && b->fd >= 0) {
            close(b->fd);
            b->fd = -1;
        }
    return -1;
}

/* The reply deadline of a request that waits up to `wait` seconds in the
 * broker (< 0: for ever): that plus the grace, none for ever (§6). */
static double until(const bq *b, double wait)
{
    return wait < 0 || isinf(wait) ? -1 : now() + wait + b->grace;
}

/* Send request req (from begin()), read its reply into r by the deadline
 * and check that it carries the fields in need. */
static int call(bq *b, mp_buf *req, const char *op, double deadline, unsigned need,
                struct reply *r)
{
    memset(r, 0, sizeof *r);
    if (b->fd < 0) {
        mp_free(req);
        return fail(b, "unavailable", "not connected");
    }
    uint64_t id = b->next_id++;
    mp_str(req, "id");
    mp_uint(req, id);
    if (req->failed) {
        mp_free(req);
        return fail(b, "nomem", "out of memory");
    }
    size_t len = req->len - 4;
    if (len > b->max_frame) {   /* the broker would answer bad_frame and close */
        mp_free(req);
        return fail(b, "too_large", "request of %zu bytes is over the frame limit of %lu",
                    len, (unsigned long)b->max_frame);
    }
    for (int k = 0; k < 4; k++)
        req->data[k] = (uint8_t)(len >> (24 - 8 * k));
    int rc = io_all(b, req->data, req->len, 1, deadline);
    mp_free(req);
    if (rc)
        return -1;
    if (recv_reply(b, r, deadline))
        return -1;
    if (mp_is(&r->op, "error") && (r->id == id || r->id == 0))
        return error_reply(b, r);
    if (r->id != id || !mp_is(&r->op, op) || (r->have & need) != need)
        return broken(b, "protocol", "unexpected reply to %s", op);
    return 0;
}

/* ---- connecting (§8, §10.3) ---- */

static int peer_is_us(int fd)
{
#ifdef SO_PEERCRED
    struct ucred cr;
    socklen_t l = sizeof cr;
    return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &l) == 0 && cr.uid == geteuid();
#else
    uid_t uid;
    gid_t gid;
    return getpeereid(fd, &uid, &gid) == 0 && uid == geteuid();
#endif
}

/* §10.3 step 1: 1 connected, 0 nobody listens, 2 a broker listens but its
 * backlog is full (EAGAIN: back off and connect again, never spawn), -1 a
 * hard error. */
static int try_connect(bq *b)
{
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    memcpy(a.sun_path, b->path, strlen(b->path));
    b->fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (b->fd < 0)
        return fail(b, "unavailable", "socket: %s", strerror(errno));
    /* Non-blocking for good: every read and write waits in poll() with a deadline. */
    fcntl(b->fd, F_SETFD, FD_CLOEXEC);
    fcntl(b->fd, F_SETFL, O_NONBLOCK);
    if (connect(b->fd, (struct sockaddr *)&a, sizeof a) == 0) {
        if (peer_is_us(b->fd))
            return 1;
        return broken(b, "permission", "%s", "the broker runs as another user");
    }
    int e = errno;
    close(b->fd);
    b->fd = -1;
    if (e == EAGAIN)
        return 2;
    if (e == ENOENT || e == ECONNREFUSED || e == EINPROGRESS)
        return 0;
    if (e == EACCES || e == EPERM)
        return fail(b, "permission", "connect %s: %s", b->path, strerror(e));
    return fail(b, "unavailable", "connect %s: %s", b->path, strerror(e));
}

/* §4, §5.1. 0 ok, -1 error, 1 the broker closed before answering (it was
 * exiting, §10.5; §4 "End of a connection"): try again. */
static int hello(bq *b, double deadline)
{
    mp_buf req;
    struct reply r;
    b->eof = 0;
    b->max_frame = HELLO_LIMIT;
    begin(&req, "hello", 2);
    mp_str(&req, "version");
    mp_uint(&req, 1);
    mp_str(&req, "client");
    mp_str(&req, "brokerq-c 0.1");
    int rc = call(b, &req, "hello", deadline, F_PID | F_FRAME, &r);
    if (rc == 0) {
        b->pid = (long)r.pid;
        b->max_frame = (uint32_t)(r.max_frame < UINT32_MAX ? r.max_frame : UINT32_MAX);
    }
    free(r.frame);
    return rc && b->eof && b->fd < 0 ? 1 : rc;
}

/* The broker program (§10.4 step 1), as an absolute path, searched on the
 * caller's PATH: the broker itself is given only PATH=/bin:/usr/bin. */
static int find_broker(bq *b, char *out, size_t n)
{
    const char *prog = getenv("BROKERQ_BROKER");
    if (!prog || !*prog)
        prog = "local-queue-broker";
    if (strchr(prog, '/')) {
        if (absolute(prog, out, n) == 0 && access(out, X_OK) == 0)
            return 0;
    } else {
        const char *path = getenv("PATH");
        char dirs[8192];
        snprintf(dirs, sizeof dirs, "%s", path ? path : "/bin:/usr/bin");
        char *save;
        for (char *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
            char cand[PATH_MAX];
            snprintf(cand, sizeof cand, "%s/%s", d, prog);
            if (access(cand, X_OK) == 0 && absolute(cand, out, n) == 0)
                return 0;
        }
    }
    return fail(b, "unavailable", "cannot find the broker program %s (set BROKERQ_BROKER)", prog);
}

/* The child's side of §10.4 step 3; never returns. */
static void exec_broker(const char *prog, char **argv, char **envp, int lock, int ready, int log)
{
    static const int sigs[] = {SIGPIPE, SIGINT, SIGQUIT, SIGTERM, SIGHUP, SIGCHLD};
    sigset_t none;
    /* Lift the fds we pass above 2 first, so stdio can be set up whatever they were. */
    lock = fcntl(lock, F_DUPFD, 10);
    ready = fcntl(ready, F_DUPFD, 10);
    log = fcntl(log, F_DUPFD, 10);
    int null = open("/dev/null", O_RDWR);
    if (setsid() < 0 || chdir("/") || lock < 0 || ready < 0 || log < 0 || null < 0)
        _exit(127);
    dup2(null, 0);
    dup2(null, 1);
    dup2(log, 2);
    dup2(lock, 3);              /* dup2 clears close-on-exec: the broker inherits these */
    dup2(ready, 4);
    long max = sysconf(_SC_OPEN_MAX);
    for (int fd = 5; fd < (max > 0 && max < 65536 ? max : 65536); fd++)
        close(fd);              /* "no other descriptor besides stdio" */
    /* The caller's ignored signals and mask would pass through exec. */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        signal(sigs[i], SIG_DFL);
    execve(prog, argv, envp);
    _exit(127);
}

/* The environment of the broker: the caller's BROKERQ_* and PATH=/bin:/usr/bin. */
static char **broker_env(void)
{
    size_t n = 0, k = 0;
    while (environ[n])
        n++;
    char **env = calloc(n + 2, sizeof *env);
    if (!env)
        return NULL;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "BROKERQ_", 8) == 0)
            env[k++] = environ[i];
    env[k] = "PATH=/bin:/usr/bin";
    return env;
}

/* Read "READY <pid>\n" from fd (§10.4 step 4): 0, -1 anything else, -2 the deadline. */
static int read_ready(int fd, double deadline)
{
    char line[64];
    size_t n = 0;
    while (n < sizeof line - 1 && (n == 0 || line[n - 1] != '\n')) {
        if (wait_fd(fd, POLLIN, deadline))
            return -2;
        ssize_t k = read(fd, line + n, sizeof line - 1 - n);
        if (k == 0)
            return -1;
        if (k < 0 && errno != EINTR && errno != EAGAIN)
            return -1;
        n += k > 0 ? (size_t)k : 0;
    }
    line[n] = '\0';
    char *end;
    if (strncmp(line, "READY ", 6) || strtol(line + 6, &end, 10) <= 0 || strcmp(end, "\n"))
        return -1;
    return 0;
}

/* §10.4: start a broker handing it the locked lock fd; 0 once it said READY. */
static int spawn(bq *b, int lock, double deadline)
{
    char prog[PATH_MAX], log[sizeof b->path + 8];
    int pipefd[2];
    if (find_broker(b, prog, sizeof prog))
        return -1;
    snprintf(log, sizeof log, "%s.log", b->path);
    int logfd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (logfd < 0)
        return fail(b, "unavailable", "cannot open %s: %s", log, strerror(errno));
    char **env = broker_env();
    if (!env || pipe(pipefd)) {
        free(env);
        close(logfd);
        return fail(b, "unavailable", "cannot start the broker: %s", strerror(errno));
    }
    fcntl(pipefd[0], F_SETFD, FD_CLOEXEC);
    fcntl(pipefd[1], F_SETFD, FD_CLOEXEC);
    char *argv[] = {prog, b->path, "--daemon", "--lock-fd", "3", "--ready-fd", "4", NULL};
    pid_t pid = fork();
    if (pid == 0)
        exec_broker(prog, argv, env, lock, pipefd[1], logfd);
    free(env);
    close(pipefd[1]);
    close(logfd);
    int ready = pid > 0 ? read_ready(pipefd[0], deadline) : -1;
    close(pipefd[0]);
    /* --daemon: the started process forks the broker and exits at once, so
     * wait for it, unless it is stuck past the deadline. */
    while (pid > 0 && waitpid(pid, NULL, ready == -2 ? WNOHANG : 0) < 0 && errno == EINTR)
        ;
    if (ready)
        return fail(b, "unavailable", "the broker did not start (see %s)", log);
    return 0;
}

/* §10.3 step 2: 1 a broker was started, 0 one exists (lock busy), -1 error. */
static int lock_and_spawn(bq *b, double deadline)
{
    char path[sizeof b->path + 8];
    snprintf(path, sizeof path, "%s.lock", b->path);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return fail(b, "unavailable", "cannot open %s: %s", path, strerror(errno));
    int rc = 0;
    if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
        if (ftruncate(fd, 0)) { /* only clears a dead broker's pid: harmless if it fails */
        }
        rc = spawn(b, fd, deadline) ? -1 : 1;
    } else if (errno != EWOULDBLOCK) {
        rc = fail(b, "unavailable", "flock %s: %s", path, strerror(errno));
    }
    close(fd);                  /* the broker holds the lock through its own copy */
    return rc;
}

bq *bq_open(const char *path, double timeout)
{
    bq *b = calloc(1, sizeof *b);
    char given[PATH_MAX], full[PATH_MAX];
    if (!b)
        return NULL;
    b->fd = -1;
    b->grace = timeout;
    b->next_id = 1;
    if (!path && bq_default_socket(given, sizeof given) == 0)
        path = given;
    if (!path || absolute(path, full, sizeof full)) {
        fail(b, "path", "cannot make the socket path absolute: %s", path ? path : "(default)");
        return b;
    }
    if (strlen(full) > SUN_MAX) {  /* sun_path holds no more (§10.1 step 3) */
        fail(b, "path", "socket path is %zu bytes, over the limit of %d: %s", strlen(full),
             (int)SUN_MAX, full);
        return b;
    }
    memcpy(b->path, full, strlen(full) + 1);
    if (check_dir(b))
        return b;
    double deadline = now() + timeout, delay = 0.001;
    srand((unsigned)getpid() ^ (unsigned)(now() * 1e6));
    for (;;) {
        int spawned = 0, rc = try_connect(b);
        if (rc == 1 && hello(b, deadline) != 1)
            return b;           /* connected, or a handshake error retrying cannot fix */
        if (rc < 0 || (rc == 0 && (spawned = lock_and_spawn(b, deadline)) < 0))
            return b;
        if (now() >= deadline) {
            fail(b, "unavailable", "no broker answered on %s within %g s", b->path, timeout);
            return b;
        }
        if (spawned)
            continue;           /* it said READY: connect again at once */
        /* The lock is busy (a broker starts or exits), the backlog is full,
         * or the broker closed on us as it exited: a jittered, growing
         * sleep, then again. */
        nap(delay * (0.5 + (double)rand() / ((double)RAND_MAX + 1)));
        delay = delay * 2 < 0.05 ? delay * 2 : 0.05;
    }
}

int bq_ok(const bq *b) { return b->fd >= 0; }
const char *bq_code(const bq *b) { return b->code; }
const char *bq_message(const bq *b) { return b->message; }
long bq_broker_pid(const bq *b) { return b->pid; }

void bq_close(bq *b)
{
    if (b && b->fd >= 0)
        close(b->fd);           /* the broker ends this connection's leases */
    free(b);
}

/* ---- requests (§5) ---- */

int bq_put(bq *b, const char *queue, const void *body, size_t len, uint64_t *id)
{
    mp_buf req;
    struct reply r;
    begin(&req, "put", 2);
    mp_str(&req, "queue");
    mp_str(&req, queue);
    mp_str(&req, "body");
    mp_bin(&req, body, len);
    /* No put timeout is sent: on a full queue the broker waits for room for
     * ever (§5.18), so the reply gets no deadline either (§6). */
    int rc = call(b, &req, "put", until(b, BQ_FOREVER), F_MSG_ID, &r);
    if (rc == 0 && id)
        *id = r.msg_id;
    free(r.frame);
    return rc;
}

/* get and reserve: a message out of reply r. */
static int take_msg(bq *b, const struct reply *r, bq_msg *m)
{
    memset(m, 0, sizeof *m);
    m->id = r->msg_id;
    m->attempt = r->attempt;
    m->lease = r->lease;
    m->len = r->body.len;
    if (!(m->body = malloc(m->len ? m->len : 1)))
        return fail(b, "nomem", "out of memory");
    if (m->len)
        memcpy(m->body, r->body.ptr, m->len);
    return 0;
}

static int dequeue(bq *b, const char *op, const char *queue, double timeout, double lease,
                   unsigned need, bq_msg *m)
{
    mp_buf req;
    struct reply r;
    int forever = timeout < 0;
    begin(&req, op, 1 + !forever + (lease >= 0));
    mp_str(&req, "queue");
    mp_str(&req, queue);
    if (!forever) {             /* absent: wait for ever (§6) */
        mp_str(&req, "timeout");
        mp_float(&req, timeout);
    }
    if (lease >= 0) {           /* the broker judges it (§5.12) */
        mp_str(&req, "lease");
        mp_float(&req, lease);
    }
    int rc = call(b, &req, op, until(b, timeout), need, &r);
    if (rc == 0)
        rc = take_msg(b, &r, m);
    free(r.frame);
    return rc;
}

int bq_get(bq *b, const char *queue, double timeout, bq_msg *m)
{
    return dequeue(b, "get", queue, timeout, BQ_DEFAULT, F_MSG_ID | F_BODY, m);
}

int bq_reserve(bq *b, const char *queue, double timeout, double lease, bq_msg *m)
{
    return dequeue(b, "reserve", queue, timeout, lease, F_MSG_ID | F_BODY | F_ATTEMPT | F_LEASE, m);
}

/* ack, release, bury, touch: msg_id and attempt, then an optional float. */
static int verb(bq *b, const char *op, uint64_t id, uint64_t attempt, const char *extra,
                double value, double *left)
{
    mp_buf req;
    struct reply r;
    begin(&req, op, 2 + (extra != NULL));
    mp_str(&req, "msg_id");
    mp_uint(&req, id);
    mp_str(&req, "attempt");
    mp_uint(&req, attempt);
    if (extra) {
        mp_str(&req, extra);
        mp_float(&req, value);
    }
    int rc = call(b, &req, op, until(b, 0), left ? F_LEASE : 0, &r);
    if (rc == 0 && left)
        *left = r.lease;
    free(r.frame);
    return rc;
}

int bq_ack(bq *b, uint64_t id, uint64_t attempt)
{
    return verb(b, "ack", id, attempt, NULL, 0, NULL);
}

int bq_release(bq *b, uint64_t id, uint64_t attempt, double delay)
{
    return verb(b, "release", id, attempt, "delay", delay, NULL);
}

int bq_bury(bq *b, uint64_t id, uint64_t attempt)
{
    return verb(b, "bury", id, attempt, NULL, 0, NULL);
}

int bq_touch(bq *b, uint64_t id, uint64_t attempt, double lease, double *left)
{
    double dummy;
    return verb(b, "touch", id, attempt, lease >= 0 ? "lease" : NULL, lease, left ? left : &dummy);
}
