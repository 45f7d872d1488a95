/* tls.c — the server's TLS identity and the OpenSSL side of the HTTPS health listener.
 *
 * The identity is kept as PEM text because grpc_ssl_server_credentials_create takes PEM;
 * OpenSSL is used only to check it (parse, key matches leaf), to generate an ephemeral
 * self-signed certificate when no files are given, and to serve the health listener.
 * This is the only file that includes OpenSSL. */
#include "tls.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "log.h"

/* PEM files larger than this are certainly not a certificate chain or a key. */
#define PEM_MAX (1024 * 1024)

/* Validity of the ephemeral certificate: back-dated an hour for clock skew. */
#define EPHEMERAL_BACKDATE_SECS (60L * 60)
#define EPHEMERAL_LIFETIME_SECS (365L * 24 * 60 * 60)

/* The most recent OpenSSL error as text (and the queue emptied), for one-line messages. */
static const char *ssl_errstr(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    if (e == 0)
        snprintf(buf, len, "unknown error");
    else
        ERR_error_string_n(e, buf, len);
    ERR_clear_error();
    return buf;
}

/* Reads a whole file into a NUL-terminated malloc'd buffer; *out_len excludes the NUL.
 * -1 with errno set on failure (EFBIG when over PEM_MAX). */
static char *read_file(const char *path, size_t *out_len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (buf == NULL)
        goto fail;
    for (;;) {
        if (len + 1 >= cap) {
            if (cap >= PEM_MAX) {
                errno = EFBIG;
                goto fail;
            }
            char *nb = malloc(cap * 2);
            if (nb == NULL)
                goto fail;
            memcpy(nb, buf, len);
            /* The buffer may hold a private key: never leave a copy in freed memory. */
            OPENSSL_cleanse(buf, cap);
            free(buf);
            buf = nb;
            cap *= 2;
        }
        size_t n = fread(buf + len, 1, cap - 1 - len, f);
        len += n;
        if (n == 0) {
            if (ferror(f)) {
                if (errno == 0)
                    errno = EIO;
                goto fail;
            }
            break;
        }
    }
    fclose(f);
    buf[len] = '\0';
    *out_len = len;
    return buf;
fail:;
    int saved = errno;
    if (buf != NULL) {
        OPENSSL_cleanse(buf, cap);
        free(buf);
    }
    fclose(f);
    errno = saved;
    return NULL;
}

/* A password callback that refuses: an encrypted key fails to load instead of prompting
 * on the terminal. */
static int no_password(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return 0;
}

static void fingerprint_of(X509 *leaf, char out[3 * 32])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    out[0] = '\0';
    if (!X509_digest(leaf, EVP_sha256(), md, &n) || n != 32)
        return;
    static const char hex[] = "0123456789ABCDEF";
    char *p = out;
    for (unsigned int i = 0; i < n; i++) {
        if (i > 0)
            *p++ = ':';
        *p++ = hex[md[i] >> 4];
        *p++ = hex[md[i] & 15];
    }
    *p = '\0';
}

/* Copies the contents of a memory BIO into a NUL-terminated malloc'd string. */
static char *bio_to_string(BIO *bio)
{
    char *data;
    long n = BIO_get_mem_data(bio, &data);
    if (n < 0)
        return NULL;
    char *s = malloc((size_t)n + 1);
    if (s == NULL)
        return NULL;
    memcpy(s, data, (size_t)n);
    s[n] = '\0';
    return s;
}

static int load_files(struct tls_identity *id, const char *cert_path, const char *key_path,
                      char *err, size_t errlen)
{
    char ebuf[256];
    int rc = -1;
    size_t cert_len = 0, key_len = 0;
    char *cert_pem = NULL, *key_pem = NULL;
    BIO *bio = NULL;
    X509 *leaf = NULL, *extra = NULL;
    EVP_PKEY *key = NULL;

    cert_pem = read_file(cert_path, &cert_len);
    if (cert_pem == NULL) {
        snprintf(err, errlen, "cannot read certificate chain %s: %s", cert_path, strerror(errno));
        goto done;
    }
    key_pem = read_file(key_path, &key_len);
    if (key_pem == NULL) {
        snprintf(err, errlen, "cannot read private key %s: %s", key_path, strerror(errno));
        goto done;
    }
    if (cert_len > INT_MAX || key_len > INT_MAX) { /* unreachable with PEM_MAX */
        snprintf(err, errlen, "%s: file too large", cert_path);
        goto done;
    }

    /* The first certificate is the leaf; the rest (intermediates) must parse too, since
     * gRPC hands the whole chain to its TLS library. */
    bio = BIO_new_mem_buf(cert_pem, (int)cert_len);
    if (bio == NULL || (leaf = PEM_read_bio_X509(bio, NULL, no_password, NULL)) == NULL) {
        ERR_clear_error();
        snprintf(err, errlen, "%s: no PEM certificate found", cert_path);
        goto done;
    }
    while ((extra = PEM_read_bio_X509(bio, NULL, no_password, NULL)) != NULL)
        X509_free(extra);
    unsigned long e = ERR_peek_last_error();
    if (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE) {
        ERR_clear_error(); /* the normal end of the chain */
    } else if (e != 0) {
        snprintf(err, errlen, "%s: bad certificate in chain: %s", cert_path,
                 ssl_errstr(ebuf, sizeof ebuf));
        goto done;
    }
    BIO_free(bio);

    bio = BIO_new_mem_buf(key_pem, (int)key_len);
    if (bio == NULL || (key = PEM_read_bio_PrivateKey(bio, NULL, no_password, NULL)) == NULL) {
        ERR_clear_error();
        snprintf(err, errlen, "%s: no PEM private key found (encrypted keys are not supported)",
                 key_path);
        goto done;
    }
    if (!X509_check_private_key(leaf, key)) {
        ERR_clear_error();
        snprintf(err, errlen, "private key %s does not match the certificate %s", key_path,
                 cert_path);
        goto done;
    }

    if (X509_cmp_current_time(X509_get0_notAfter(leaf)) < 0)
        log_warn("certificate %s has expired", cert_path);
    else if (X509_cmp_current_time(X509_get0_notBefore(leaf)) > 0)
        log_warn("certificate %s is not valid yet", cert_path);

    fingerprint_of(leaf, id->fingerprint);
    id->cert_pem = cert_pem;
    id->key_pem = key_pem;
    id->ephemeral = 0;
    cert_pem = key_pem = NULL;
    rc = 0;
done:
    BIO_free(bio);
    X509_free(leaf);
    EVP_PKEY_free(key);
    free(cert_pem);
    if (key_pem != NULL) {
        OPENSSL_cleanse(key_pem, key_len);
        free(key_pem);
    }
    return rc;
}

static int add_ext(X509 *x, X509V3_CTX *ctx, int nid, const char *value)
{
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, ctx, nid, value);
    if (ext == NULL)
        return 0;
    int ok = X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    return ok;
}

/* A self-signed EC P-256 certificate for localhost. It is its own trust anchor (clients
 * pass it as their root certificate), so it is marked CA:TRUE with keyCertSign: verifiers
 * reject a trust anchor that says CA:FALSE or lacks keyCertSign. It also carries
 * serverAuth and the SANs, so it is a valid server certificate for localhost. */
static int generate(struct tls_identity *id, char *err, size_t errlen)
{
    char ebuf[256];
    int rc = -1;
    EVP_PKEY *key = NULL;
    X509 *x = NULL;
    BIGNUM *bn = NULL;
    BIO *cbio = NULL, *kbio = NULL;
    char *cert_pem = NULL, *key_pem = NULL;
    const char *step;

    step = "key generation";
    key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (key == NULL)
        goto fail;

    step = "certificate";
    x = X509_new();
    if (x == NULL || !X509_set_version(x, X509_VERSION_3))
        goto fail;
    /* A random positive 127-bit serial (RFC 5280: positive, at most 20 octets). */
    unsigned char serial[16];
    if (RAND_bytes(serial, sizeof serial) != 1)
        goto fail;
    serial[0] &= 0x7f;
    serial[0] |= 0x40; /* never zero, never a short encoding */
    bn = BN_bin2bn(serial, sizeof serial, NULL);
    if (bn == NULL || BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) == NULL)
        goto fail;
    if (X509_gmtime_adj(X509_getm_notBefore(x), -EPHEMERAL_BACKDATE_SECS) == NULL ||
        X509_gmtime_adj(X509_getm_notAfter(x), EPHEMERAL_LIFETIME_SECS) == NULL)
        goto fail;
    X509_NAME *name = X509_get_subject_name(x);
    if (!X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                                    (const unsigned char *)"luacallout ephemeral", -1, -1, 0) ||
        !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                    (const unsigned char *)"localhost", -1, -1, 0) ||
        !X509_set_issuer_name(x, name) || !X509_set_pubkey(x, key))
        goto fail;

    step = "certificate extensions";
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
    if (!add_ext(x, &ctx, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") ||
        !add_ext(x, &ctx, NID_key_usage, "critical,digitalSignature,keyCertSign") ||
        !add_ext(x, &ctx, NID_ext_key_usage, "serverAuth") ||
        !add_ext(x, &ctx, NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1,IP:::1") ||
        !add_ext(x, &ctx, NID_subject_key_identifier, "hash"))
        goto fail;

    step = "signing";
    if (X509_sign(x, key, EVP_sha256()) == 0)
        goto fail;

    step = "PEM encoding";
    cbio = BIO_new(BIO_s_mem());
    kbio = BIO_new(BIO_s_mem());
    if (cbio == NULL || kbio == NULL || !PEM_write_bio_X509(cbio, x) ||
        !PEM_write_bio_PrivateKey(kbio, key, NULL, NULL, 0, NULL, NULL))
        goto fail;
    cert_pem = bio_to_string(cbio);
    key_pem = bio_to_string(kbio);
    if (cert_pem == NULL || key_pem == NULL)
        goto fail;

    fingerprint_of(x, id->fingerprint);
    id->cert_pem = cert_pem;
    id->key_pem = key_pem;
    id->ephemeral = 1;
    cert_pem = key_pem = NULL;
    rc = 0;
    goto done;
fail:
    snprintf(err, errlen, "cannot generate an ephemeral certificate (%s): %s", step,
             ssl_errstr(ebuf, sizeof ebuf));
done:
    EVP_PKEY_free(key);
    X509_free(x);
    BN_free(bn);
    BIO_free(cbio);
    /* The memory BIO's buffer holds the key: cleanse it before release. */
    if (kbio != NULL) {
        char *data;
        long n = BIO_get_mem_data(kbio, &data);
        if (n > 0)
            OPENSSL_cleanse(data, (size_t)n);
        BIO_free(kbio);
    }
    free(cert_pem);
    if (key_pem != NULL) {
        OPENSSL_cleanse(key_pem, strlen(key_pem));
        free(key_pem);
    }
    return rc;
}

int tls_identity_load(struct tls_identity *id, const char *cert_path, const char *key_path,
                      char *err, size_t errlen)
{
    memset(id, 0, sizeof *id);
    if ((cert_path == NULL) != (key_path == NULL)) {
        snprintf(err, errlen, "--cert_chain_path and --private_key_path must be given together");
        return -1;
    }
    if (cert_path != NULL)
        return load_files(id, cert_path, key_path, err, errlen);
    return generate(id, err, errlen);
}

void tls_identity_free(struct tls_identity *id)
{
    if (id == NULL)
        return;
    free(id->cert_pem);
    if (id->key_pem != NULL) {
        OPENSSL_cleanse(id->key_pem, strlen(id->key_pem));
        free(id->key_pem);
    }
    memset(id, 0, sizeof *id);
}

/* --- the HTTPS health listener ------------------------------------------------------- */

struct tls_server {
    SSL_CTX *ctx;
};

struct tls_conn {
    SSL *ssl;
    int broken; /* a fatal error happened: send no close_notify */
};

struct tls_server *tls_server_new(const struct tls_identity *id, char *err, size_t errlen)
{
    char ebuf[256];
    struct tls_server *srv = calloc(1, sizeof *srv);
    BIO *bio = NULL;
    X509 *cert = NULL;
    EVP_PKEY *key = NULL;
    const char *step = "context";

    if (srv == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    srv->ctx = SSL_CTX_new(TLS_server_method());
    if (srv->ctx == NULL || !SSL_CTX_set_min_proto_version(srv->ctx, TLS1_2_VERSION))
        goto fail;
    /* Non-blocking sockets: a write that wants a retry may be retried from a buffer that
     * has moved (the caller keeps the bytes, not the pointer). */
    SSL_CTX_clear_mode(srv->ctx, SSL_MODE_AUTO_RETRY);
    SSL_CTX_set_mode(srv->ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* One request per connection: no session resumption, no renegotiation. */
    SSL_CTX_set_session_cache_mode(srv->ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(srv->ctx, SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION |
                                      SSL_OP_CIPHER_SERVER_PREFERENCE);

    step = "certificate chain";
    bio = BIO_new_mem_buf(id->cert_pem, -1);
    if (bio == NULL || (cert = PEM_read_bio_X509(bio, NULL, no_password, NULL)) == NULL ||
        !SSL_CTX_use_certificate(srv->ctx, cert))
        goto fail;
    X509 *extra;
    while ((extra = PEM_read_bio_X509(bio, NULL, no_password, NULL)) != NULL) {
        if (!SSL_CTX_add0_chain_cert(srv->ctx, extra)) {
            X509_free(extra);
            goto fail;
        }
    }
    ERR_clear_error(); /* the end of the chain */
    BIO_free(bio);

    step = "private key";
    bio = BIO_new_mem_buf(id->key_pem, -1);
    if (bio == NULL || (key = PEM_read_bio_PrivateKey(bio, NULL, no_password, NULL)) == NULL ||
        !SSL_CTX_use_PrivateKey(srv->ctx, key) || !SSL_CTX_check_private_key(srv->ctx))
        goto fail;

    BIO_free(bio);
    X509_free(cert);
    EVP_PKEY_free(key);
    return srv;
fail:
    snprintf(err, errlen, "cannot set up TLS for the health listener (%s): %s", step,
             ssl_errstr(ebuf, sizeof ebuf));
    BIO_free(bio);
    X509_free(cert);
    EVP_PKEY_free(key);
    tls_server_free(srv);
    return NULL;
}

void tls_server_free(struct tls_server *srv)
{
    if (srv == NULL)
        return;
    SSL_CTX_free(srv->ctx);
    free(srv);
}

struct tls_conn *tls_conn_new(struct tls_server *srv, int fd)
{
    char ebuf[256];
    struct tls_conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->ssl = SSL_new(srv->ctx);
    if (c->ssl == NULL || !SSL_set_fd(c->ssl, fd)) {
        log_debug("health check: TLS setup failed: %s", ssl_errstr(ebuf, sizeof ebuf));
        ERR_clear_error();
        SSL_free(c->ssl);
        free(c);
        return NULL;
    }
    SSL_set_accept_state(c->ssl);
    return c;
}

/* Maps the result r of an SSL_* call to TLS_WANT_*, or TLS_ERROR (marking the connection
 * broken); what names the step in the debug log. Clears OpenSSL's error queue, which is
 * per thread and would otherwise leak into the next connection's diagnosis. */
static int io_status(struct tls_conn *c, int r, const char *what)
{
    int saved = errno;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        ERR_clear_error();
        return TLS_WANT_READ;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
        ERR_clear_error();
        return TLS_WANT_WRITE;
    }
    char ebuf[256];
    if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)
        log_debug("health check: TLS %s failed: %s", what,
                  saved == 0 ? "connection closed" : strerror(saved));
    else if (e != SSL_ERROR_ZERO_RETURN)
        log_debug("health check: TLS %s failed: %s", what, ssl_errstr(ebuf, sizeof ebuf));
    ERR_clear_error();
    c->broken = 1;
    return TLS_ERROR;
}

int tls_conn_handshake(struct tls_conn *c)
{
    int r = SSL_do_handshake(c->ssl);
    return r == 1 ? 1 : io_status(c, r, "handshake");
}

ssize_t tls_conn_read(struct tls_conn *c, void *buf, size_t len)
{
    if (len > INT_MAX)
        len = INT_MAX;
    int n = SSL_read(c->ssl, buf, (int)len);
    if (n > 0)
        return n;
    if (SSL_get_error(c->ssl, n) == SSL_ERROR_ZERO_RETURN) {
        ERR_clear_error();
        return 0; /* close_notify */
    }
    return io_status(c, n, "read");
}

ssize_t tls_conn_write(struct tls_conn *c, const void *buf, size_t len)
{
    if (len == 0)
        return 0;
    if (len > INT_MAX)
        len = INT_MAX;
    int n = SSL_write(c->ssl, buf, (int)len);
    return n > 0 ? n : io_status(c, n, "write");
}

void tls_conn_close_notify(struct tls_conn *c)
{
    if (c == NULL || c->broken)
        return;
    SSL_shutdown(c->ssl); /* non-blocking: sends what the socket takes, awaits nothing */
    ERR_clear_error();
}

void tls_conn_free(struct tls_conn *c)
{
    if (c == NULL)
        return;
    SSL_free(c->ssl);
    free(c);
}
