/* tls_port.c — see tls_port.h.
 *
 * grpc calls the fetcher (from its own threads) once when the port is added and then
 * before every handshake; it answers UNCHANGED unless tls_port_set has been called since
 * grpc last took a config. grpc builds a new handshaker factory from a NEW config and, if
 * that fails, keeps the old one (so a certificate the checks in tls.c let through but
 * grpc's TLS library refuses leaves the old one serving, with grpc's own error in the
 * debug log). */
#include "tls_port.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tls.h"

struct tls_port {
    pthread_mutex_t lock;
    struct tls_identity id;   /* PEM texts only */
    uint64_t version;         /* bumped by every tls_port_set */
    uint64_t fetched;         /* the version grpc took last */
    int mtls;                 /* fixed when the port is made */
};

/* Copies id's PEM texts into *to. 0, or -1 (out of memory, *to empty). */
static int copy_identity(struct tls_identity *to, const struct tls_identity *id)
{
    memset(to, 0, sizeof *to);
    to->cert_pem = strdup(id->cert_pem);
    to->key_pem = strdup(id->key_pem);
    to->client_ca_pem = id->client_ca_pem ? strdup(id->client_ca_pem) : NULL;
    if (!to->cert_pem || !to->key_pem || (id->client_ca_pem && !to->client_ca_pem)) {
        tls_identity_free(to);
        return -1;
    }
    return 0;
}

struct tls_port *tls_port_new(const struct tls_identity *id)
{
    struct tls_port *p = calloc(1, sizeof *p);
    if (!p || copy_identity(&p->id, id) != 0) {
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->lock, NULL);
    p->version = 1;
    p->mtls = id->client_ca_pem != NULL;
    return p;
}

static grpc_ssl_certificate_config_reload_status fetch(void *arg,
                                                       grpc_ssl_server_certificate_config **out)
{
    struct tls_port *p = arg;
    grpc_ssl_certificate_config_reload_status status = GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED;
    pthread_mutex_lock(&p->lock);
    if (p->fetched != p->version) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = p->id.key_pem,
                                           .cert_chain = p->id.cert_pem};
        /* Debian's grpc 1.51 asserts that a fetched config has root certificates, which
         * a port that asks for no client certificate never uses: it gets the server's own
         * chain. grpc copies the texts, and destroys the config once it has used it. */
        const char *roots = p->mtls ? p->id.client_ca_pem : p->id.cert_pem;
        *out = grpc_ssl_server_certificate_config_create(roots, &pair, 1);
        status = *out ? GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_NEW
                      : GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_FAIL;
        if (*out)
            p->fetched = p->version;
    }
    pthread_mutex_unlock(&p->lock);
    return status;
}

grpc_server_credentials *tls_port_credentials(struct tls_port *p)
{
    grpc_ssl_server_credentials_options *opts =
        grpc_ssl_server_credentials_create_options_using_config_fetcher(
            p->mtls ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                    : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            fetch, p);
    return opts ? grpc_ssl_server_credentials_create_with_options(opts) : NULL;
}

int tls_port_set(struct tls_port *p, const struct tls_identity *id)
{
    struct tls_identity copy;
    if (copy_identity(&copy, id) != 0)
        return -1;
    pthread_mutex_lock(&p->lock);
    struct tls_identity old = p->id;
    p->id = copy;
    p->version++;
    pthread_mutex_unlock(&p->lock);
    tls_identity_free(&old);
    return 0;
}

void tls_port_free(struct tls_port *p)
{
    if (!p)
        return;
    tls_identity_free(&p->id);
    pthread_mutex_destroy(&p->lock);
    free(p);
}
