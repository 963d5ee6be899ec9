/* brokerq-c - put, get and reserve on a brokerq broker from the shell.
 * Exit status as the Python `brokerq` command: 0 ok, 1 error, 2 usage,
 * 3 empty or timed out (or a full queue). */
#define _POSIX_C_SOURCE 200809L
#include "brokerq.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char usage_text[] =
    "usage: brokerq-c [-s SOCKET] put QUEUE [BODY]\n"
    "       brokerq-c [-s SOCKET] get QUEUE [-t SECONDS]\n"
    "       brokerq-c [-s SOCKET] reserve QUEUE [-t SECONDS] [-l LEASE]\n"
    "\n"
    "put: BODY, or without it all of stdin, as one message; prints its id.\n"
    "get: writes the body to stdout as it is. -t: wait at most SECONDS\n"
    "  (0: not at all; default: for ever).\n"
    "reserve: writes '<id> <attempt> <length>\\n' and the body, then reads\n"
    "  verbs on stdin, one a line, each answered 'ok' or 'error CODE MESSAGE':\n"
    "  ack | release [DELAY] | bury | touch [LEASE]. EOF ends the session\n"
    "  (an unacked message goes back to the queue). -l: lease seconds.\n"
    "SOCKET: default $BROKERQ_SOCKET, else the per-user path.\n"
    "Exit status: 0 ok, 1 error, 2 usage, 3 empty or timed out.\n";

static int usage(const char *why)
{
    fprintf(stderr, "brokerq-c: %s\n%s", why, usage_text);
    return 2;
}

/* A failed call: one line on stderr, and the exit status its code means. */
static int failed(bq *b)
{
    fprintf(stderr, "brokerq-c: %s: %s\n", bq_code(b), bq_message(b));
    return strcmp(bq_code(b), "empty") == 0 || strcmp(bq_code(b), "full") == 0 ? 3 : 1;
}

/* A non-negative number of seconds (positive if strict); -1 if it is not one. */
static double seconds(const char *s, int strict)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (!*s || *end || errno || isnan(v) || v < 0 || (strict && v == 0))
        return -1;
    return v;
}

static int write_all(const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t k = write(STDOUT_FILENO, c, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

/* All of stdin, binary-safe: NULL on a read error (or no memory). */
static unsigned char *read_stdin(size_t *len)
{
    size_t cap = 65536, k;
    unsigned char *buf = malloc(cap);
    *len = 0;
    while (buf && (k = fread(buf + *len, 1, cap - *len, stdin)) > 0) {
        *len += k;
        if (*len == cap) {          /* full: double it */
            unsigned char *more = realloc(buf, cap *= 2);
            if (!more)
                free(buf);
            buf = more;
        }
    }
    if (buf && ferror(stdin)) {
        free(buf);
        buf = NULL;
    }
    return buf;
}

static int put(bq *b, const char *queue, const char *arg)
{
    size_t len = arg ? strlen(arg) : 0;
    unsigned char *body = arg ? (unsigned char *)arg : read_stdin(&len);
    uint64_t id;
    if (!body) {
        fprintf(stderr, "brokerq-c: cannot read stdin: %s\n", strerror(errno));
        return 1;
    }
    int rc = bq_put(b, queue, body, len, &id);
    if (!arg)
        free(body);
    if (rc)
        return failed(b);
    printf("%llu\n", (unsigned long long)id);
    return fflush(stdout) ? 1 : 0;
}

static int get(bq *b, const char *queue, double timeout)
{
    bq_msg m;
    if (bq_get(b, queue, timeout, &m))
        return failed(b);
    int rc = write_all(m.body, m.len);
    free(m.body);
    return rc ? 1 : 0;
}

/* One verb line of a reserve session; its answer goes to stdout. */
static void answer(bq *b, const bq_msg *m, char *line)
{
    char *save, *verb = strtok_r(line, " \t\r\n", &save);
    char *arg = verb ? strtok_r(NULL, " \t\r\n", &save) : NULL;
    double v = arg ? seconds(arg, 0) : 0;
    int rc;
    if (!verb || (arg && strtok_r(NULL, " \t\r\n", &save)) || v < 0) {
        printf("error usage expected ack, release [DELAY], bury or touch [LEASE]\n");
        return;
    }
    if (strcmp(verb, "ack") == 0 && !arg)
        rc = bq_ack(b, m->id, m->attempt);
    else if (strcmp(verb, "release") == 0)
        rc = bq_release(b, m->id, m->attempt, v);
    else if (strcmp(verb, "bury") == 0 && !arg)
        rc = bq_bury(b, m->id, m->attempt);
    else if (strcmp(verb, "touch") == 0)
        rc = bq_touch(b, m->id, m->attempt, arg ? v : BQ_DEFAULT, NULL);
    else {
        printf("error usage unknown verb '%s'\n", verb);
        return;
    }
    if (rc == 0) {
        printf("ok\n");
        return;
    }
    char msg[512];                  /* keep the answer on one line */
    snprintf(msg, sizeof msg, "%s", bq_message(b));
    for (char *c = msg; *c; c++)
        if (*c == '\n' || *c == '\r')
            *c = ' ';
    printf("error %s %s\n", bq_code(b), msg);
}

static int reserve(bq *b, const char *queue, double timeout, double lease)
{
    bq_msg m;
    char *line = NULL;
    size_t cap = 0;
    if (bq_reserve(b, queue, timeout, lease, &m))
        return failed(b);
    printf("%llu %llu %zu\n", (unsigned long long)m.id, (unsigned long long)m.attempt, m.len);
    fflush(stdout);
    int rc = write_all(m.body, m.len);
    while (rc == 0 && getline(&line, &cap, stdin) > 0) {
        answer(b, &m, line);
        if (fflush(stdout))
            rc = 1;
    }
    free(line);
    free(m.body);
    return rc ? 1 : 0;              /* bq_close (in main) ends an unacked lease */
}

int main(int argc, char **argv)
{
    const char *sock = NULL, *pos[4] = {NULL};
    double timeout = BQ_FOREVER, lease = BQ_DEFAULT;
    int npos = 0, only_pos = 0, has_t = 0, has_l = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!only_pos && strcmp(a, "--") == 0) {
            only_pos = 1;
        } else if (!only_pos && (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0)) {
            fputs(usage_text, stdout);
            return 0;
        } else if (!only_pos && (!strcmp(a, "-s") || !strcmp(a, "-t") || !strcmp(a, "-l"))) {
            if (++i == argc)
                return usage("an option needs a value");
            if (a[1] == 's')
                sock = argv[i];
            else if (a[1] == 't' && (has_t = 1) && (timeout = seconds(argv[i], 0)) < 0)
                return usage("-t needs a number of seconds, 0 or more");
            else if (a[1] == 'l' && (has_l = 1) && (lease = seconds(argv[i], 1)) < 0)
                return usage("-l needs a number of seconds above 0");
        } else if (!only_pos && a[0] == '-' && a[1]) {
            return usage("unknown option");
        } else if (npos < 4) {
            pos[npos++] = a;
        } else {
            return usage("too many arguments");
        }
    }
    const char *cmd = pos[0];
    int is_put = cmd && !strcmp(cmd, "put"), is_get = cmd && !strcmp(cmd, "get");
    int is_res = cmd && !strcmp(cmd, "reserve");
    if (!is_put && !is_get && !is_res)
        return usage(cmd ? "unknown command" : "a command is needed");
    if (npos < 2 || npos > (is_put ? 3 : 2) || (is_put && has_t) || (!is_res && has_l))
        return usage("wrong arguments for this command");
    if (sock && !*sock)
        return usage("-s needs a path");

    bq *b = bq_open(sock, 10.0);
    if (!b) {
        fprintf(stderr, "brokerq-c: out of memory\n");
        return 1;
    }
    int rc = !bq_ok(b) ? failed(b)
             : is_put  ? put(b, pos[1], pos[2])
             : is_get  ? get(b, pos[1], timeout)
                       : reserve(b, pos[1], timeout, lease);
    bq_close(b);
    return rc;
}
