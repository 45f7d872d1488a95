/* tls_port.h — the credentials of the TLS gRPC port, with a certificate that can change
 * while the server runs: grpc asks for the current one (its certificate config fetcher)
 * before each new handshake, so a reload reaches the next connection and leaves open ones
 * alone. With a client CA bundle, every client must present a certificate that chains to
 * it (mTLS). */
#ifndef LUACALLOUT_TLS_PORT_H
#define LUACALLOUT_TLS_PORT_H

#include <grpc/grpc_security.h>

struct tls_identity;
struct tls_port;

/* Keeps a copy of id (its certificate, key and client CA). Whether clients must present a
 * certificate is decided here, by id->client_ca_pem, for the port's lifetime. NULL when
 * out of memory. */
struct tls_port *tls_port_new(const struct tls_identity *id);

/* Credentials for grpc_server_add_http2_port (which takes them over). The port must
 * outlive the grpc server they are used by. NULL when out of memory. */
grpc_server_credentials *tls_port_credentials(struct tls_port *p);

/* The identity handshakes use from now on (a copy is kept); connections already open keep
 * theirs. Safe from any thread. 0, or -1 when out of memory (the old one stays). */
int tls_port_set(struct tls_port *p, const struct tls_identity *id);

void tls_port_free(struct tls_port *p);

#endif
