/* tls.h — the server's TLS identity (certificate chain + private key, PEM) and the
 * OpenSSL side of the HTTPS health listener. Only tls.c includes OpenSSL. */
#ifndef LUACALLOUT_TLS_H
#define LUACALLOUT_TLS_H

#include <stddef.h>
#include <sys/types.h>

struct tls_identity {
    char *cert_pem;   /* NUL-terminated PEM certificate chain */
    char *key_pem;    /* NUL-terminated PEM private key */
    int ephemeral;    /* 1 when generated in memory at start-up */
    char fingerprint[3 * 32]; /* SHA-256 of the leaf certificate, "AB:CD:..." */
};

/* Reads cert_path and key_path (both set) and checks that the key matches the
 * certificate; with both NULL, generates an ephemeral self-signed certificate
 * (CN=localhost, SAN localhost, 127.0.0.1, ::1) in memory. 0 on success; -1 with
 * one line in err (e.g. "cannot read certificate chain /x: No such file ..."). */
int tls_identity_load(struct tls_identity *id, const char *cert_path, const char *key_path,
                      char *err, size_t errlen);
void tls_identity_free(struct tls_identity *id);

/* Server-side TLS for the HTTPS health listener, on non-blocking sockets: no call here
 * ever waits for the peer. The caller owns the fd, polls it for what a call asked for
 * (TLS_WANT_READ: readable, TLS_WANT_WRITE: writable) and calls again; the overall
 * deadline of a connection is the caller's. */
struct tls_server;
struct tls_conn;
enum {
    TLS_ERROR = -1,      /* the connection is unusable: free it */
    TLS_WANT_READ = -2,  /* call again when the socket is readable */
    TLS_WANT_WRITE = -3, /* call again when the socket is writable */
};
struct tls_server *tls_server_new(const struct tls_identity *id, char *err, size_t errlen);
void tls_server_free(struct tls_server *srv);
/* Wraps an accepted, non-blocking socket; no I/O yet. NULL when out of memory. */
struct tls_conn *tls_conn_new(struct tls_server *srv, int fd);
/* Advances the server handshake: 1 when it is complete, or TLS_WANT_READ,
 * TLS_WANT_WRITE, TLS_ERROR (the reason is logged at debug level). */
int tls_conn_handshake(struct tls_conn *c);
/* After the handshake: bytes moved (> 0), 0 when the peer closed (read only), or
 * TLS_WANT_READ, TLS_WANT_WRITE, TLS_ERROR. A write that wants a retry must be retried
 * with the same bytes. */
ssize_t tls_conn_read(struct tls_conn *c, void *buf, size_t len);
ssize_t tls_conn_write(struct tls_conn *c, const void *buf, size_t len);
/* Sends close_notify if the socket takes it now; the peer's is not awaited. */
void tls_conn_close_notify(struct tls_conn *c);
/* Frees the TLS state without any I/O; the caller closes the fd. NULL is a no-op. */
void tls_conn_free(struct tls_conn *c);

#endif
