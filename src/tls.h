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

/* Server-side TLS for the HTTPS health listener. */
struct tls_server;
struct tls_conn;
struct tls_server *tls_server_new(const struct tls_identity *id, char *err, size_t errlen);
void tls_server_free(struct tls_server *srv);
/* Handshake on an accepted, blocking socket (with a receive timeout set by the caller);
 * NULL when the handshake fails. The fd stays owned by the caller. */
struct tls_conn *tls_conn_accept(struct tls_server *srv, int fd);
ssize_t tls_conn_read(struct tls_conn *c, void *buf, size_t len);
ssize_t tls_conn_write(struct tls_conn *c, const void *buf, size_t len);
void tls_conn_free(struct tls_conn *c);

#endif
