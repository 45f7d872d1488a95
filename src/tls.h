/* tls.h — the server's TLS identity (certificate chain + private key, PEM) and the
 * OpenSSL side of the HTTPS health listener. Only tls.c includes OpenSSL. */
#ifndef LUACALLOUT_TLS_H
#define LUACALLOUT_TLS_H

#include <stddef.h>
#include <sys/types.h>

struct tls_identity {
    char *cert_pem;      /* NUL-terminated PEM certificate chain */
    char *key_pem;       /* NUL-terminated PEM private key */
    char *client_ca_pem; /* PEM bundle client certificates must chain to; NULL: not asked */
    int ephemeral;       /* 1 when generated in memory at start-up */
    int client_cas;      /* certificates in client_ca_pem */
    char fingerprint[3 * 32]; /* SHA-256 of the leaf certificate, "AB:CD:..." */
    char serial[48];     /* of the leaf, hex */
    char not_after[32];  /* of the leaf, "2027-01-31 12:00:00 UTC" */
};

/* Where an identity comes from: the flags. */
struct tls_source {
    const char *cert_path, *key_path; /* both, or neither: an ephemeral certificate */
    const char *client_ca_path;       /* NULL: no client certificates (no mTLS) */
    const char *hostnames;            /* the ephemeral certificate's names, comma-separated
                                       * DNS names and IP addresses; NULL: TLS_HOSTNAMES */
};

/* The names of the ephemeral certificate when --cert_hostnames is not given. */
#define TLS_HOSTNAMES "localhost,127.0.0.1,::1"

/* Reads the certificate chain and key (and checks that the key matches the leaf), or
 * generates an ephemeral self-signed certificate (EC P-256, SANs from src->hostnames) in
 * memory; then reads the client CA bundle, if any. Every file is checked the way a TLS
 * library will use it (each PEM certificate parses, the CA bundle has at least one). 0 on
 * success; -1 with one line in err (e.g. "cannot read certificate chain /x: No such file
 * ..."). */
int tls_identity_load(struct tls_identity *id, const struct tls_source *src, char *err,
                      size_t errlen);
/* For a reload: reads src's files again into *next, as tls_identity_load does, except
 * that an ephemeral certificate is kept (cur's: clients may have pinned it) and only the
 * client CA bundle is read again. 0, or -1 with one line in err (*next is then empty). */
int tls_identity_reload(const struct tls_identity *cur, const struct tls_source *src,
                        struct tls_identity *next, char *err, size_t errlen);
/* 1 when a and b hold the same certificate, key and client CA bundle. */
int tls_identity_same(const struct tls_identity *a, const struct tls_identity *b);
void tls_identity_free(struct tls_identity *id);

/* The CONTROL_IDENTITY record (control.h): the certificate PEM, NUL, the key PEM, NUL, the
 * client CA PEM (empty without one); an empty record for no identity. pack: malloc'd,
 * NULL when out of memory. unpack: data must have a NUL after its len bytes (control_recv
 * adds one); 0, or -1 when malformed or out of memory. Neither fills the fingerprint and
 * the other descriptive fields. */
char *tls_identity_pack(const struct tls_identity *id, size_t *len);
int tls_identity_unpack(struct tls_identity *id, const char *data, size_t len);

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
/* The listener's TLS context. Health probes present no certificate (kubelet's do not),
 * so the listener never asks for one, whatever id->client_ca_pem says. */
struct tls_server *tls_server_new(const struct tls_identity *id, char *err, size_t errlen);
/* Replaces the certificate and key for the connections accepted from now on; those
 * already open finish with the old ones. Safe from any thread. 0, or -1 with err (the
 * old identity stays). */
int tls_server_set_identity(struct tls_server *srv, const struct tls_identity *id, char *err,
                            size_t errlen);
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
