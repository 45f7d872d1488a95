/* jwt.c — `callout.jwt`, RS256 JSON Web Tokens for scripts:
 *
 *   local key = callout.jwt.load_key(path_or_pem)          -- an RSA key; raises if unusable
 *   local claims, why = callout.jwt.decode(token, key [, { leeway = s, audience = a, now = t }])
 *
 * decode checks what PyJWT's jwt.decode(token, key, algorithms=["RS256"]) checks, in the
 * same order, so that a script ported from a Python callout accepts and refuses the same
 * tokens: the three segments, the JOSE header (kid, crit, b64, alg == "RS256"), the
 * RSASSA-PKCS1-v1_5 SHA-256 signature, then the registered claims iat, nbf, exp (with
 * Python's int() coercion), aud (refused when no audience is expected), sub and jti (must
 * be strings). A valid token gives its claims; an invalid one nil and PyJWT's reason.
 *
 * Claims come back as callout.json values (src/json.c parses them, with yajl): objects
 * keep the token's key order for pairs() and json.encode, arrays are sequences marked as
 * such (callout.jwt.is_array, like json.kind(v) == "array", tells an empty one from an
 * empty object), integers are Lua integers, other numbers floats, null is callout.null. As
 * Python's json does, a repeated key keeps its first place and takes the last value, and a
 * UTF-8 byte order mark is skipped; unlike it, NaN, Infinity and unpaired \uD800-style
 * surrogates are refused (src/json.c follows RFC 8259): such a token is invalid ("Invalid
 * payload string: ..."). The base64url reader accepts what Python's binascii (non-strict)
 * accepts, which OpenSSL's strict decoders do not (they refuse what PyJWT skips), so it
 * stays ours. PyJWT is the reference. */
#include "jwt.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <openssl/bio.h>
#include <openssl/decoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "json.h"
#include "pbstruct.h"
#include "vm.h"

#define KEY_MT "callout.jwt.key"

/* ------------------------------------------------------------------------------------ */
/* base64url, the way PyJWT decodes a segment: pad with '=' to a multiple of 4 (counting */
/* every byte), map -_ to +/, then binascii.a2b_base64 in non-strict mode, which skips  */
/* bytes outside the alphabet and stops at the padding.                                  */
/* ------------------------------------------------------------------------------------ */

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
}

/* Decodes in[0..len) into out (room for len / 4 * 3 + 3 bytes); -1 where Python raises
 * binascii.Error. */
static int b64url_decode(const unsigned char *in, size_t len, unsigned char *out, size_t *outlen)
{
    size_t padded = len + (len % 4 ? 4 - len % 4 : 0);
    unsigned char *o = out;
    int quad = 0, pads = 0;
    unsigned left = 0;
    for (size_t i = 0; i < padded; i++) {
        unsigned char c = i < len ? in[i] : '=';
        if (c == '=') {
            if (quad >= 2 && quad + ++pads >= 4)
                goto done;          /* a complete pad sequence ends the input */
            continue;
        }
        int v = b64_value(c);
        if (v < 0)
            continue;               /* non-strict: anything else is skipped */
        pads = 0;
        switch (quad) {
        case 0: left = (unsigned)v; quad = 1; break;
        case 1: *o++ = (unsigned char)(left << 2 | (unsigned)v >> 4); left = (unsigned)v & 0x0f; quad = 2; break;
        case 2: *o++ = (unsigned char)(left << 4 | (unsigned)v >> 2); left = (unsigned)v & 0x03; quad = 3; break;
        default: *o++ = (unsigned char)(left << 6 | (unsigned)v); left = 0; quad = 0; break;
        }
    }
    if (quad != 0)
        return -1;                  /* "Incorrect padding" or a lone extra character */
done:
    *outlen = (size_t)(o - out);
    return 0;
}

/* Pushes the decoded segment as a Lua string (GC-owned: nothing leaks if Lua raises);
 * -1 (nothing pushed) when it does not decode. */
static int push_b64url(lua_State *L, const char *in, size_t len)
{
    unsigned char *buf = lua_newuserdatauv(L, len / 4 * 3 + 4, 0);
    size_t n;
    if (b64url_decode((const unsigned char *)in, len, buf, &n) != 0) {
        lua_pop(L, 1);
        return -1;
    }
    lua_pushlstring(L, (const char *)buf, n);
    lua_remove(L, -2);
    return 0;
}

static bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* ------------------------------------------------------------------------------------ */
/* Keys and signatures                                                                   */
/* ------------------------------------------------------------------------------------ */

static int key_gc(lua_State *L)
{
    EVP_PKEY **k = luaL_checkudata(L, 1, KEY_MT);
    EVP_PKEY_free(*k);
    *k = NULL;
    return 0;
}

static int key_tostring(lua_State *L)
{
    EVP_PKEY **k = luaL_checkudata(L, 1, KEY_MT);
    lua_pushfstring(L, "callout.jwt key (RSA, %d bits)", *k ? EVP_PKEY_get_bits(*k) : 0);
    return 1;
}

/* load_key(path_or_pem): an RSA key from PEM text (any string holding "-----BEGIN") or a
 * PEM file: a public key (SubjectPublicKeyInfo or PKCS#1) or a private key, whose public
 * half is used. Raises, naming the file, when there is no usable RSA key. */
static int l_load_key(lua_State *L)
{
    size_t len;
    const char *arg = luaL_checklstring(L, 1, &len);
    bool pem = strstr(arg, "-----BEGIN") != NULL;
    EVP_PKEY **k = lua_newuserdatauv(L, sizeof *k, 0);
    *k = NULL;
    luaL_setmetatable(L, KEY_MT);
    /* a path is read under the sandbox's rules: once, while the script loads */
    size_t flen = 0;
    const char *file = pem ? NULL : vm_read_file(L, "callout.jwt.load_key", arg, &flen);
    ERR_clear_error();
    BIO *bio = pem    ? BIO_new_mem_buf(arg, (int)len)
               : file ? BIO_new_mem_buf(file, (int)flen)
                      : BIO_new_file(arg, "rb");
    if (bio == NULL) {
        int e = errno;
        ERR_clear_error();
        return luaL_error(L, "callout.jwt.load_key: cannot read '%s': %s", arg,
                          pem ? "out of memory" : strerror(e));
    }
    OSSL_DECODER_CTX *d = OSSL_DECODER_CTX_new_for_pkey(k, "PEM", NULL, "RSA", 0, NULL, NULL);
    bool ok = d != NULL && OSSL_DECODER_from_bio(d, bio) == 1 && *k != NULL;
    OSSL_DECODER_CTX_free(d);
    BIO_free(bio);
    ERR_clear_error();          /* this thread's queue is shared with the TLS code */
    if (!ok)
        return luaL_error(L, "callout.jwt.load_key: no RSA key in %s%s%s",
                          pem ? "the PEM text" : "'", pem ? "" : arg, pem ? "" : "'");
    return 1;
}

static bool verify_rs256(EVP_PKEY *key, const char *data, size_t len, const char *sig,
                         size_t siglen)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md != NULL &&
              EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, key) == 1 &&
              EVP_DigestVerify(md, (const unsigned char *)sig, siglen,
                               (const unsigned char *)data, len) == 1;
    EVP_MD_CTX_free(md);
    ERR_clear_error();
    return ok;
}

/* ------------------------------------------------------------------------------------ */
/* decode                                                                                */
/* ------------------------------------------------------------------------------------ */

static bool is_array(lua_State *L, int idx)
{
    return ljson_kind(L, idx) == LJSON_ARRAY;
}

/* Python truthiness of a decoded JSON value. */
static bool truthy(lua_State *L, int idx)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return false;
    case LUA_TBOOLEAN: return lua_toboolean(L, idx);
    case LUA_TNUMBER: return lua_tonumber(L, idx) != 0;
    case LUA_TSTRING: return lua_rawlen(L, idx) > 0;
    case LUA_TTABLE:
        lua_pushnil(L);
        if (lua_next(L, idx < 0 ? idx - 1 : idx) != 0) {
            lua_pop(L, 2);
            return true;
        }
        return false;
    default: return !pbstruct_is_null(L, idx);
    }
}

/* Python's int(v) for a time claim, as a double: false where int() raises. */
static bool claim_int(lua_State *L, int idx, double *out)
{
    switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN:
        *out = lua_toboolean(L, idx);
        return true;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) {
            *out = (double)lua_tointeger(L, idx);
            return true;
        }
        *out = trunc((double)lua_tonumber(L, idx));
        return isfinite(*out);
    case LUA_TSTRING: {
        /* int(" -1_700 ") == -1700: blanks around, a sign, digits with single '_' between */
        const char *s = lua_tostring(L, idx), *e = s + lua_rawlen(L, idx);
        while (s < e && (*s == ' ' || (*s >= '\t' && *s <= '\r') || (*s >= 0x1c && *s <= 0x1f)))
            s++;
        while (e > s && (e[-1] == ' ' || (e[-1] >= '\t' && e[-1] <= '\r') ||
                         (e[-1] >= 0x1c && e[-1] <= 0x1f)))
            e--;
        double sign = 1, v = 0;
        if (s < e && (*s == '+' || *s == '-'))
            sign = *s++ == '-' ? -1 : 1;
        if (s == e || !is_digit((unsigned char)*s))
            return false;
        for (; s < e; s++) {
            if (*s == '_' && s + 1 < e && is_digit((unsigned char)s[1]))
                continue;
            if (!is_digit((unsigned char)*s))
                return false;
            v = v * 10 + (*s - '0');
        }
        *out = sign * v;
        return true;
    }
    default:
        return false;           /* null, arrays, objects: TypeError in Python */
    }
}

struct opts {
    double leeway, now;
    int audience;               /* stack index of a string or a list of strings, or 0 */
};

/* The token's claim checks, in PyJWT's order. claims at idx; NULL when they pass. */
static const char *check_claims(lua_State *L, int idx, const struct opts *o)
{
    static const struct {
        const char *name, *not_int, *fails;
        bool future;            /* fails when later than now, else when not later */
    } times[] = {
        {"iat", "Issued At claim (iat) must be an integer.", "The token is not yet valid (iat)", true},
        {"nbf", "Not Before claim (nbf) must be an integer.", "The token is not yet valid (nbf)", true},
        {"exp", "Expiration Time claim (exp) must be an integer.", "Signature has expired", false},
    };
    const char *why = NULL;
    for (size_t i = 0; i < sizeof times / sizeof times[0] && why == NULL; i++) {
        if (lua_getfield(L, idx, times[i].name) != LUA_TNIL) {
            double t;
            if (!claim_int(L, -1, &t))
                why = times[i].not_int;
            else if (times[i].future ? t > o->now + o->leeway : t <= o->now - o->leeway)
                why = times[i].fails;
        }
        lua_pop(L, 1);
    }
    if (why != NULL)
        return why;

    lua_getfield(L, idx, "aud");
    int aud = lua_gettop(L);
    if (o->audience == 0) {
        if (truthy(L, aud))
            why = "Invalid audience";
    } else if (!truthy(L, aud)) {
        why = "Token is missing the \"aud\" claim";
    } else if (lua_type(L, aud) != LUA_TSTRING && !is_array(L, aud)) {
        why = "Invalid claim format in token";
    } else {
        lua_Integer n = lua_type(L, aud) == LUA_TSTRING ? 0 : (lua_Integer)lua_rawlen(L, aud);
        for (lua_Integer i = 1; i <= n && why == NULL; i++) {
            if (lua_rawgeti(L, aud, i) != LUA_TSTRING)
                why = "Invalid claim format in token";
            lua_pop(L, 1);
        }
        bool match = false;
        lua_Integer m = lua_type(L, o->audience) == LUA_TSTRING ? 1
                        : (lua_Integer)lua_rawlen(L, o->audience);
        for (lua_Integer a = 1; a <= m && why == NULL && !match; a++) {
            if (lua_type(L, o->audience) == LUA_TSTRING)
                lua_pushvalue(L, o->audience);
            else
                lua_rawgeti(L, o->audience, a);
            if (n == 0) {
                match = lua_rawequal(L, -1, aud);
            } else {
                for (lua_Integer i = 1; i <= n && !match; i++) {
                    lua_rawgeti(L, aud, i);
                    match = lua_rawequal(L, -1, -2);
                    lua_pop(L, 1);
                }
            }
            lua_pop(L, 1);
        }
        if (why == NULL && !match)
            why = "Audience doesn't match";
    }
    lua_pop(L, 1);
    if (why != NULL)
        return why;

    if (lua_getfield(L, idx, "sub") != LUA_TNIL && lua_type(L, -1) != LUA_TSTRING)
        why = "Subject must be a string";
    lua_pop(L, 1);
    if (why == NULL && lua_getfield(L, idx, "jti") != LUA_TNIL && lua_type(L, -1) != LUA_TSTRING)
        why = "JWT ID must be a string";
    lua_pop(L, 1);
    return why;
}

/* The JOSE header checks, in PyJWT's order (kid, crit, b64, then alg). */
static const char *check_header(lua_State *L, int h)
{
    const char *why = NULL;
    if (lua_getfield(L, h, "kid") != LUA_TNIL && lua_type(L, -1) != LUA_TSTRING)
        why = "Key ID header parameter must be a string";
    lua_pop(L, 1);
    if (why == NULL && lua_getfield(L, h, "crit") != LUA_TNIL) {
        int c = lua_gettop(L);
        lua_Integer n = is_array(L, c) ? (lua_Integer)lua_rawlen(L, c) : 0;
        if (n == 0)
            why = "Invalid 'crit' header: must be a non-empty list";
        for (lua_Integer i = 1; i <= n && why == NULL; i++) {
            if (lua_rawgeti(L, c, i) != LUA_TSTRING)
                why = "Invalid 'crit' header: values must be strings";
            else if (strcmp(lua_tostring(L, -1), "b64") != 0)
                why = "Unsupported critical extension";
            else if (lua_getfield(L, h, "b64") == LUA_TNIL)
                why = "Critical extension 'b64' is missing from headers";
            lua_settop(L, c);
        }
    }
    lua_pop(L, 1);
    if (why != NULL)
        return why;
    if (lua_getfield(L, h, "b64") == LUA_TBOOLEAN && !lua_toboolean(L, -1))
        why = "Detached payloads (b64: false) are not supported";
    lua_pop(L, 1);
    if (why != NULL)
        return why;
    int t = lua_getfield(L, h, "alg");
    if (t == LUA_TNIL)
        why = "Algorithm not specified";
    else if (t != LUA_TSTRING || strcmp(lua_tostring(L, -1), "RS256") != 0)
        why = "The specified alg value is not allowed";
    lua_pop(L, 1);
    return why;
}

static void read_opts(lua_State *L, int idx, struct opts *o)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    o->now = (double)ts.tv_sec + ts.tv_nsec / 1e9;
    o->leeway = 0;
    o->audience = 0;
    if (lua_isnoneornil(L, idx))
        return;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
        if (strcmp(k, "leeway") == 0 || strcmp(k, "now") == 0) {
            if (lua_type(L, -1) != LUA_TNUMBER)
                luaL_error(L, "callout.jwt.decode: option '%s' must be a number", k);
            if (k[0] == 'l')
                o->leeway = (double)lua_tonumber(L, -1);
            else
                o->now = (double)lua_tonumber(L, -1);
        } else if (strcmp(k, "audience") != 0) {
            luaL_error(L, "callout.jwt.decode: unknown option '%s'", k);
        }
        lua_pop(L, 1);
    }
    if (lua_getfield(L, idx, "audience") == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    bool ok = lua_type(L, -1) == LUA_TSTRING;
    if (lua_type(L, -1) == LUA_TTABLE) {
        ok = true;
        for (lua_Integer i = 1; i <= (lua_Integer)lua_rawlen(L, -1); i++) {
            ok = ok && lua_rawgeti(L, -1, i) == LUA_TSTRING;
            lua_pop(L, 1);
        }
    }
    if (!ok)
        luaL_error(L, "callout.jwt.decode: option 'audience' must be a string or a list of strings");
    o->audience = lua_gettop(L);
}

/* decode(token, key [, options]) -> claims | nil, reason */
static int l_decode(lua_State *L)
{
    size_t len;
    const char *tok = luaL_checklstring(L, 1, &len);
    EVP_PKEY **key = luaL_checkudata(L, 2, KEY_MT);
    luaL_argcheck(L, *key != NULL, 2, "a released key");
    struct opts o;
    read_opts(L, 3, &o);
    const char *why = NULL;
    char jerr[200], reason[256];
    const char *last = memrchr(tok, '.', len);
    const char *first = last != NULL ? memchr(tok, '.', (size_t)(last - tok)) : NULL;
    if (first == NULL) {
        why = "Not enough segments";
        goto invalid;
    }
    /* 1 token, 2 key, 3 options, then: */
    if (push_b64url(L, tok, (size_t)(first - tok)) != 0) {
        why = "Invalid header padding";
        goto invalid;
    }
    size_t hlen;
    const char *htext = lua_tolstring(L, -1, &hlen);
    if (ljson_decode(L, htext, hlen, LJSON_DUPLICATES | LJSON_SKIP_BOM, jerr, sizeof jerr) != 0) {
        snprintf(reason, sizeof reason, "Invalid header string: %s", jerr);
        why = reason;
        goto invalid;
    }
    int header = lua_gettop(L);
    if (!lua_istable(L, header) || is_array(L, header)) {
        why = "Invalid header string: must be a json object";
        goto invalid;
    }
    if (push_b64url(L, first + 1, (size_t)(last - first - 1)) != 0) {
        why = "Invalid payload padding";
        goto invalid;
    }
    int payload = lua_gettop(L);
    if (push_b64url(L, last + 1, len - (size_t)(last + 1 - tok)) != 0) {
        why = "Invalid crypto padding";
        goto invalid;
    }
    int sig = lua_gettop(L);
    if ((why = check_header(L, header)) != NULL)
        goto invalid;
    size_t siglen;
    const char *sigbytes = lua_tolstring(L, sig, &siglen);
    if (!verify_rs256(*key, tok, (size_t)(last - tok), sigbytes, siglen)) {
        why = "Signature verification failed";
        goto invalid;
    }
    size_t plen;
    const char *ptext = lua_tolstring(L, payload, &plen);
    if (ljson_decode(L, ptext, plen, LJSON_DUPLICATES | LJSON_SKIP_BOM, jerr, sizeof jerr) != 0) {
        snprintf(reason, sizeof reason, "Invalid payload string: %s", jerr);
        why = reason;
        goto invalid;
    }
    int claims = lua_gettop(L);
    if (!lua_istable(L, claims) || is_array(L, claims)) {
        why = "Invalid payload string: must be a json object";
        goto invalid;
    }
    if ((why = check_claims(L, claims, &o)) != NULL)
        goto invalid;
    lua_settop(L, claims);
    return 1;
invalid:
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
}

/* is_array(v): whether v is an array decoded from a token (an empty one included) */
static int l_is_array(lua_State *L)
{
    lua_pushboolean(L, is_array(L, 1));
    return 1;
}

int jwt_open(lua_State *L)
{
    luaL_checkstack(L, 6, "callout.jwt");
    if (luaL_newmetatable(L, KEY_MT)) {
        lua_pushcfunction(L, key_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, key_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);

    static const luaL_Reg fns[] = {
        {"load_key", l_load_key},
        {"decode", l_decode},
        {"is_array", l_is_array},
        {NULL, NULL},
    };
    luaL_newlib(L, fns);
    return 1;
}
