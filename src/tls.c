/* tls.c — the server's TLS identity and the OpenSSL side of the HTTPS health listener.
 *
 * The identity is kept as PEM text because grpc's server certificate configs take PEM
 * (tls_port.c hands it to grpc); OpenSSL is used only to check it (parse, key matches
 * leaf, the client CA bundle parses), to generate an ephemeral self-signed certificate
 * when no files are given, and to serve the health listener.
 * This is the only file that includes OpenSSL. */
#include "tls.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* Parses every PEM certificate in pem[0..len) into a new stack (at least one, else an
 * error): what the TLS library will do with a chain or a CA bundle, so that a file it
 * would refuse is refused here, with the file's name. what names the file in err. */
static STACK_OF(X509) *parse_certs(const char *pem, size_t len, const char *what,
                                   const char *path, char *err, size_t errlen)
{
    char ebuf[256];
    STACK_OF(X509) *certs = sk_X509_new_null();
    BIO *bio = len <= INT_MAX ? BIO_new_mem_buf(pem, (int)len) : NULL;
    X509 *x;
    if (certs == NULL || bio == NULL) {
        snprintf(err, errlen, "%s %s: out of memory", what, path);
        goto fail;
    }
    while ((x = PEM_read_bio_X509(bio, NULL, no_password, NULL)) != NULL) {
        if (!sk_X509_push(certs, x)) {
            X509_free(x);
            snprintf(err, errlen, "%s %s: out of memory", what, path);
            goto fail;
        }
    }
    unsigned long e = ERR_peek_last_error();
    if (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE) {
        ERR_clear_error(); /* the normal end of the file */
    } else if (e != 0) {
        snprintf(err, errlen, "%s %s: bad certificate (number %d): %s", what, path,
                 sk_X509_num(certs) + 1, ssl_errstr(ebuf, sizeof ebuf));
        goto fail;
    }
    if (sk_X509_num(certs) == 0) {
        snprintf(err, errlen, "%s %s: no PEM certificate found", what, path);
        goto fail;
    }
    BIO_free(bio);
    return certs;
fail:
    ERR_clear_error();
    BIO_free(bio);
    sk_X509_pop_free(certs, X509_free);
    return NULL;
}

/* The leaf's fingerprint, serial and expiry, for the logs. */
static void describe(struct tls_identity *id, X509 *leaf)
{
    fingerprint_of(leaf, id->fingerprint);
    id->serial[0] = id->not_after[0] = '\0';
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(leaf), NULL);
    char *hex = bn ? BN_bn2hex(bn) : NULL;
    if (hex)
        snprintf(id->serial, sizeof id->serial, "%s", hex);
    OPENSSL_free(hex);
    BN_free(bn);
    struct tm tm;
    if (ASN1_TIME_to_tm(X509_get0_notAfter(leaf), &tm))
        strftime(id->not_after, sizeof id->not_after, "%Y-%m-%d %H:%M:%S UTC", &tm);
    ERR_clear_error();
}

static void free_key(char *key_pem)
{
    if (key_pem != NULL) {
        OPENSSL_cleanse(key_pem, strlen(key_pem));
        free(key_pem);
    }
}

static int load_files(struct tls_identity *id, const char *cert_path, const char *key_path,
                      char *err, size_t errlen)
{
    int rc = -1;
    size_t cert_len = 0, key_len = 0;
    char *cert_pem = NULL, *key_pem = NULL;
    BIO *bio = NULL;
    STACK_OF(X509) *chain = NULL;
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
    if (key_len > INT_MAX) { /* unreachable with PEM_MAX */
        snprintf(err, errlen, "%s: file too large", key_path);
        goto done;
    }

    /* The first certificate is the leaf; the rest (intermediates) must parse too, since
     * gRPC hands the whole chain to its TLS library. */
    chain = parse_certs(cert_pem, cert_len, "certificate chain", cert_path, err, errlen);
    if (chain == NULL)
        goto done;
    X509 *leaf = sk_X509_value(chain, 0);

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

    describe(id, leaf);
    id->cert_pem = cert_pem;
    id->key_pem = key_pem;
    id->ephemeral = 0;
    cert_pem = key_pem = NULL;
    rc = 0;
done:
    BIO_free(bio);
    sk_X509_pop_free(chain, X509_free);
    EVP_PKEY_free(key);
    free(cert_pem);
    free_key(key_pem);
    return rc;
}

/* The client CA bundle: every certificate must parse. One that is not a CA, or has
 * expired, is only warned about: the TLS library decides, and the operator may mean it. */
static int load_client_ca(struct tls_identity *id, const char *path, char *err, size_t errlen)
{
    size_t len = 0;
    char *pem = read_file(path, &len);
    if (pem == NULL) {
        snprintf(err, errlen, "cannot read client CA bundle %s: %s", path, strerror(errno));
        return -1;
    }
    STACK_OF(X509) *cas = parse_certs(pem, len, "client CA bundle", path, err, errlen);
    if (cas == NULL) {
        free(pem);
        return -1;
    }
    for (int i = 0; i < sk_X509_num(cas); i++) {
        X509 *ca = sk_X509_value(cas, i);
        char name[256];
        X509_NAME_oneline(X509_get_subject_name(ca), name, sizeof name);
        if (X509_check_ca(ca) == 0)
            log_warn("client CA bundle %s: certificate %d (%s) is not a CA certificate", path,
                     i + 1, name);
        if (X509_cmp_current_time(X509_get0_notAfter(ca)) < 0)
            log_warn("client CA bundle %s: certificate %d (%s) has expired", path, i + 1, name);
    }
    ERR_clear_error();
    id->client_cas = sk_X509_num(cas);
    id->client_ca_pem = pem;
    sk_X509_pop_free(cas, X509_free);
    return 0;
}

/* One name of --cert_hostnames: an IP address ("::1" or "[::1]") or a DNS name (labels
 * of letters, digits and inner hyphens, the first may be "*"). 0 with *gen set, or -1. */
static int general_name(const char *name, GENERAL_NAME **gen)
{
    char ip[64];
    size_t n = strlen(name);
    if (n >= 2 && name[0] == '[' && name[n - 1] == ']' && n - 2 < sizeof ip) {
        memcpy(ip, name + 1, n - 2);
        ip[n - 2] = '\0';
    } else {
        snprintf(ip, sizeof ip, "%s", name);
    }
    *gen = GENERAL_NAME_new();
    if (*gen == NULL)
        return -1;
    ASN1_OCTET_STRING *addr = strchr(name, '.') || strchr(name, ':') ? a2i_IPADDRESS(ip) : NULL;
    ERR_clear_error();
    if (addr != NULL) {
        GENERAL_NAME_set0_value(*gen, GEN_IPADD, addr);
        return 0;
    }
    /* a last label of digits only is a mistyped IP address ("10.0.0.256"), not a name */
    const char *last = strrchr(name, '.');
    bool ok = n > 0 && n <= 253 && strspn(last ? last + 1 : name, "0123456789") <
                                       strlen(last ? last + 1 : name);
    for (const char *label = name; ok && label <= name + n;) {
        const char *end = strchr(label, '.');
        size_t len = end ? (size_t)(end - label) : strlen(label);
        ok = len >= 1 && len <= 63 && label[0] != '-' && label[len - 1] != '-';
        for (size_t i = 0; ok && i < len; i++) {
            char c = label[i];
            ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '-' || (c == '*' && len == 1 && label == name && end != NULL);
        }
        label += len + 1;
    }
    ASN1_IA5STRING *dns = ok ? ASN1_IA5STRING_new() : NULL;
    if (dns == NULL || !ASN1_STRING_set(dns, name, (int)n)) {
        ASN1_IA5STRING_free(dns);
        GENERAL_NAME_free(*gen);
        *gen = NULL;
        return -1;
    }
    GENERAL_NAME_set0_value(*gen, GEN_DNS, dns);
    return 0;
}

/* The SANs of --cert_hostnames ("a,b, c": spaces around a name are ignored) in x, and
 * the first name as its CN (the first DNS name if there is one, as clients that still
 * read the CN expect one). 0, or -1 with err. */
static int set_names(X509 *x, const char *list, char *err, size_t errlen)
{
    int rc = -1;
    char *copy = strdup(list);
    GENERAL_NAMES *gens = sk_GENERAL_NAME_new_null();
    const char *cn = NULL, *first = NULL;
    if (copy == NULL || gens == NULL) {
        snprintf(err, errlen, "out of memory");
        goto done;
    }
    char *save = NULL;
    int count = 0;
    for (char *p = copy;; p = NULL) {
        char *name = strtok_r(p, ",", &save);
        if (name == NULL)
            break;
        while (*name == ' ')
            name++;
        for (char *e = name + strlen(name); e > name && e[-1] == ' ';)
            *--e = '\0';
        GENERAL_NAME *gen = NULL;
        if (!*name) {
            snprintf(err, errlen, "--cert_hostnames: '%s' has an empty name", list);
            goto done;
        }
        if (general_name(name, &gen) != 0) {
            snprintf(err, errlen, "--cert_hostnames: '%s' is neither a DNS name nor an IP "
                     "address", name);
            goto done;
        }
        if (!sk_GENERAL_NAME_push(gens, gen)) {
            GENERAL_NAME_free(gen);
            snprintf(err, errlen, "out of memory");
            goto done;
        }
        if (!first)
            first = name;
        if (!cn && gen->type == GEN_DNS)
            cn = name;
        count++;
    }
    if (count == 0 || strstr(list, ",,") || list[strlen(list) - 1] == ',' || list[0] == ',') {
        snprintf(err, errlen, "--cert_hostnames: '%s' has an empty name", list);
        goto done;
    }
    if (!cn)
        cn = first;
    if (strlen(cn) > 64) /* the longest CN X.509 allows */
        cn = "luacallout";
    X509_NAME *subject = X509_get_subject_name(x);
    if (!X509_NAME_add_entry_by_txt(subject, "O", MBSTRING_ASC,
                                    (const unsigned char *)"luacallout ephemeral", -1, -1, 0) ||
        !X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1,
                                    -1, 0) ||
        !X509_set_issuer_name(x, subject) ||
        !X509_add1_ext_i2d(x, NID_subject_alt_name, gens, 0, X509V3_ADD_DEFAULT)) {
        char ebuf[256];
        snprintf(err, errlen, "cannot name the ephemeral certificate: %s",
                 ssl_errstr(ebuf, sizeof ebuf));
        goto done;
    }
    rc = 0;
done:
    GENERAL_NAMES_free(gens);
    free(copy);
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

/* A self-signed EC P-256 certificate for `hostnames`. It is its own trust anchor (clients
 * pass it as their root certificate), so it is marked CA:TRUE with keyCertSign: verifiers
 * reject a trust anchor that says CA:FALSE or lacks keyCertSign. It also carries
 * serverAuth and the SANs, so it is a valid server certificate for those names. */
static int generate(struct tls_identity *id, const char *hostnames, char *err, size_t errlen)
{
    char ebuf[256];
    int rc = -1;
    EVP_PKEY *key = NULL;
    X509 *x = NULL;
    BIGNUM *bn = NULL;
    BIO *cbio = NULL, *kbio = NULL;
    char *cert_pem = NULL, *key_pem = NULL;
    const char *step;

    /* the names first: a typo in them is the likeliest failure, and needs no key */
    x = X509_new();
    if (x == NULL) {
        snprintf(err, errlen, "out of memory");
        goto done;
    }
    if (set_names(x, hostnames, err, errlen) != 0)
        goto done;

    step = "key generation";
    key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (key == NULL)
        goto fail;

    step = "certificate";
    if (!X509_set_version(x, X509_VERSION_3))
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
        X509_gmtime_adj(X509_getm_notAfter(x), EPHEMERAL_LIFETIME_SECS) == NULL ||
        !X509_set_pubkey(x, key))
        goto fail;

    step = "certificate extensions";
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
    if (!add_ext(x, &ctx, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") ||
        !add_ext(x, &ctx, NID_key_usage, "critical,digitalSignature,keyCertSign") ||
        !add_ext(x, &ctx, NID_ext_key_usage, "serverAuth") ||
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

    describe(id, x);
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
    free_key(key_pem);
    return rc;
}

int tls_identity_load(struct tls_identity *id, const struct tls_source *src, char *err,
                      size_t errlen)
{
    memset(id, 0, sizeof *id);
    if ((src->cert_path == NULL) != (src->key_path == NULL)) {
        snprintf(err, errlen, "--cert_chain_path and --private_key_path must be given together");
        return -1;
    }
    int rc = src->cert_path != NULL
                 ? load_files(id, src->cert_path, src->key_path, err, errlen)
                 : generate(id, src->hostnames ? src->hostnames : TLS_HOSTNAMES, err, errlen);
    if (rc == 0 && src->client_ca_path != NULL &&
        load_client_ca(id, src->client_ca_path, err, errlen) != 0) {
        tls_identity_free(id);
        rc = -1;
    }
    return rc;
}

int tls_identity_reload(const struct tls_identity *cur, const struct tls_source *src,
                        struct tls_identity *next, char *err, size_t errlen)
{
    if (!cur->ephemeral)
        return tls_identity_load(next, src, err, errlen);
    memset(next, 0, sizeof *next);
    next->ephemeral = 1;
    memcpy(next->fingerprint, cur->fingerprint, sizeof next->fingerprint);
    memcpy(next->serial, cur->serial, sizeof next->serial);
    memcpy(next->not_after, cur->not_after, sizeof next->not_after);
    next->cert_pem = strdup(cur->cert_pem);
    next->key_pem = strdup(cur->key_pem);
    if (!next->cert_pem || !next->key_pem) {
        tls_identity_free(next);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (src->client_ca_path != NULL &&
        load_client_ca(next, src->client_ca_path, err, errlen) != 0) {
        tls_identity_free(next);
        return -1;
    }
    return 0;
}

static int same_text(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

int tls_identity_same(const struct tls_identity *a, const struct tls_identity *b)
{
    return same_text(a->cert_pem, b->cert_pem) && same_text(a->key_pem, b->key_pem) &&
           same_text(a->client_ca_pem, b->client_ca_pem);
}

void tls_identity_free(struct tls_identity *id)
{
    if (id == NULL)
        return;
    free(id->cert_pem);
    free_key(id->key_pem);
    free(id->client_ca_pem);
    memset(id, 0, sizeof *id);
}

char *tls_identity_pack(const struct tls_identity *id, size_t *len)
{
    if (id->cert_pem == NULL) {
        *len = 0;
        return calloc(1, 1);
    }
    const char *ca = id->client_ca_pem ? id->client_ca_pem : "";
    size_t c = strlen(id->cert_pem), k = strlen(id->key_pem), a = strlen(ca);
    char *buf = malloc(c + k + a + 3);
    if (buf == NULL)
        return NULL;
    memcpy(buf, id->cert_pem, c + 1);
    memcpy(buf + c + 1, id->key_pem, k + 1);
    memcpy(buf + c + k + 2, ca, a + 1);
    *len = c + k + a + 2;
    return buf;
}

/* A copy of the NUL-terminated text at *p (within end), *p moved past its NUL; NULL when
 * there is no NUL before end or no memory. */
static char *take_text(const char **p, const char *end)
{
    const char *nul = memchr(*p, '\0', (size_t)(end - *p));
    if (nul == NULL)
        return NULL;
    char *s = strdup(*p);
    *p = nul + 1;
    return s;
}

int tls_identity_unpack(struct tls_identity *id, const char *data, size_t len)
{
    memset(id, 0, sizeof *id);
    if (len == 0)
        return 0;
    /* control_recv puts a NUL after the record: the last text ends there */
    const char *p = data, *end = data + len + 1;
    id->cert_pem = take_text(&p, end);
    id->key_pem = id->cert_pem ? take_text(&p, end) : NULL;
    char *ca = id->key_pem && p < end ? take_text(&p, end) : NULL;
    if (!id->cert_pem || !id->key_pem || p != end) {
        free(ca);
        tls_identity_free(id);
        return -1;
    }
    if (ca != NULL && *ca != '\0')
        id->client_ca_pem = ca;
    else
        free(ca);
    return 0;
}

/* --- the HTTPS health listener ------------------------------------------------------- */

struct tls_server {
    pthread_mutex_t lock; /* ctx is replaced by a reload while connections are accepted */
    SSL_CTX *ctx;
};

struct tls_conn {
    SSL *ssl;
    int broken; /* a fatal error happened: send no close_notify */
};

/* A context serving id's certificate chain and key. NULL with err on failure. */
static SSL_CTX *server_ctx(const struct tls_identity *id, char *err, size_t errlen)
{
    char ebuf[256];
    BIO *bio = NULL;
    X509 *cert = NULL;
    EVP_PKEY *key = NULL;
    const char *step = "context";

    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL || !SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION))
        goto fail;
    /* Non-blocking sockets: a write that wants a retry may be retried from a buffer that
     * has moved (the caller keeps the bytes, not the pointer). */
    SSL_CTX_clear_mode(ctx, SSL_MODE_AUTO_RETRY);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* One request per connection: no session resumption, no renegotiation. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);

    step = "certificate chain";
    bio = BIO_new_mem_buf(id->cert_pem, -1);
    if (bio == NULL || (cert = PEM_read_bio_X509(bio, NULL, no_password, NULL)) == NULL ||
        !SSL_CTX_use_certificate(ctx, cert))
        goto fail;
    X509 *extra;
    while ((extra = PEM_read_bio_X509(bio, NULL, no_password, NULL)) != NULL) {
        if (!SSL_CTX_add0_chain_cert(ctx, extra)) {
            X509_free(extra);
            goto fail;
        }
    }
    ERR_clear_error(); /* the end of the chain */
    BIO_free(bio);

    step = "private key";
    bio = BIO_new_mem_buf(id->key_pem, -1);
    if (bio == NULL || (key = PEM_read_bio_PrivateKey(bio, NULL, no_password, NULL)) == NULL ||
        !SSL_CTX_use_PrivateKey(ctx, key) || !SSL_CTX_check_private_key(ctx))
        goto fail;

    BIO_free(bio);
    X509_free(cert);
    EVP_PKEY_free(key);
    return ctx;
fail:
    snprintf(err, errlen, "cannot set up TLS for the health listener (%s): %s", step,
             ssl_errstr(ebuf, sizeof ebuf));
    BIO_free(bio);
    X509_free(cert);
    EVP_PKEY_free(key);
    SSL_CTX_free(ctx);
    return NULL;
}

struct tls_server *tls_server_new(const struct tls_identity *id, char *err, size_t errlen)
{
    struct tls_server *srv = calloc(1, sizeof *srv);
    if (srv == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    srv->ctx = server_ctx(id, err, errlen);
    if (srv->ctx == NULL) {
        free(srv);
        return NULL;
    }
    pthread_mutex_init(&srv->lock, NULL);
    return srv;
}

int tls_server_set_identity(struct tls_server *srv, const struct tls_identity *id, char *err,
                            size_t errlen)
{
    SSL_CTX *ctx = server_ctx(id, err, errlen);
    if (ctx == NULL)
        return -1;
    pthread_mutex_lock(&srv->lock);
    SSL_CTX *old = srv->ctx;
    srv->ctx = ctx;
    pthread_mutex_unlock(&srv->lock);
    SSL_CTX_free(old); /* open connections hold their own reference */
    return 0;
}

void tls_server_free(struct tls_server *srv)
{
    if (srv == NULL)
        return;
    SSL_CTX_free(srv->ctx);
    pthread_mutex_destroy(&srv->lock);
    free(srv);
}

struct tls_conn *tls_conn_new(struct tls_server *srv, int fd)
{
    char ebuf[256];
    struct tls_conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    pthread_mutex_lock(&srv->lock);
    c->ssl = SSL_new(srv->ctx);
    pthread_mutex_unlock(&srv->lock);
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
