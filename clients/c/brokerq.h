/* brokerq.h - a small C client for the brokerq broker, written from
 * docs/protocol.md alone (protocol version 1).
 *
 * One bq is one connection, used by one thread. Every call returns 0 on
 * success or -1 on failure; then bq_code() is the broker's error code
 * (docs/protocol.md §7: "empty", "invalid", "lease_lost", ...) or one of
 * this client's own: "unavailable" (no broker reached or started in time,
 * the connection broke or a reply did not come in time), "permission"
 * (unsafe socket directory, or a broker of another user), "protocol" (the
 * broker sent something undecodable), "too_large" (a request over the
 * frame limit), "path" (the socket path cannot be used), "nomem". After an
 * "unavailable" or "protocol" error the connection is dead: bq_close it. */
#ifndef BROKERQ_H
#define BROKERQ_H

#include <stddef.h>
#include <stdint.h>

#define BQ_FOREVER (-1.0)       /* a timeout that waits for ever */
#define BQ_DEFAULT (-1.0)       /* a lease: the queue's, else the broker's */
/* (Any negative timeout waits for ever; any negative lease is the default.) */

typedef struct bq bq;

typedef struct {
    uint64_t id;                /* the message id */
    uint64_t attempt;           /* reserve: this delivery's number (1, 2, ...) */
    double lease;               /* reserve: seconds until the lease runs out */
    unsigned char *body;        /* malloc'd (never NULL on success); free() it */
    size_t len;
} bq_msg;

/* The socket path a client uses without one given: $BROKERQ_SOCKET, else
 * the per-user default (§10.1). 0, or -1 if it does not fit in n bytes. */
int bq_default_socket(char *out, size_t n);

/* Connect to the broker at path (NULL: bq_default_socket), starting one if
 * none runs, within timeout seconds; that timeout is also the grace a reply
 * gets beyond its request's own timeout. Returns NULL only when out of
 * memory; check bq_ok() before use. */
bq *bq_open(const char *path, double timeout);
int bq_ok(const bq *b);
void bq_close(bq *b);

const char *bq_code(const bq *b);
const char *bq_message(const bq *b);
long bq_broker_pid(const bq *b);

int bq_put(bq *b, const char *queue, const void *body, size_t len, uint64_t *id);
/* timeout: BQ_FOREVER, 0 (do not wait) or seconds; "empty" when none came. */
int bq_get(bq *b, const char *queue, double timeout, bq_msg *m);
int bq_reserve(bq *b, const char *queue, double timeout, double lease, bq_msg *m);
/* The lease verbs name the id and attempt a bq_reserve gave. */
int bq_ack(bq *b, uint64_t id, uint64_t attempt);
int bq_release(bq *b, uint64_t id, uint64_t attempt, double delay);
int bq_bury(bq *b, uint64_t id, uint64_t attempt);
/* lease: BQ_DEFAULT (the lease's own length again) or seconds; *left: the
 * seconds until it now runs out (left may be NULL). */
int bq_touch(bq *b, uint64_t id, uint64_t attempt, double lease, double *left);

#endif
