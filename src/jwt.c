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
 * Claims come back as plain Lua values: objects are tables whose pairs() walks the keys in
 * token order (the order a Python dict keeps), arrays are sequences (callout.jwt.is_array
 * tells an empty one from an empty object), integers are Lua integers, other numbers
 * floats, null is callout.null. The base64url and JSON readers accept what Python's
 * binascii (non-strict) and json accept: PyJWT is the reference. */
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

#include "pbstruct.h"
#include "vm.h"

#define KEY_MT "callout.jwt.key"
#define OBJECT_MT "callout.jwt.object"
#define ARRAY_MT "callout.jwt.array"
#define MAX_DEPTH 200   /* Python stops far deeper, but with an error PyJWT does not catch */

/* Registry key (by address) of the weak table object -> its key order. */
static const char order_key = 0;

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

/* ------------------------------------------------------------------------------------ */
/* JSON -> Lua, accepting what Python's json.loads accepts (NaN and Infinity included),  */
/* keeping object key order for pairs().                                                 */
/* ------------------------------------------------------------------------------------ */

struct json {
    lua_State *L;
    const unsigned char *p, *end;
    int depth;
    int order, object_mt, array_mt;     /* absolute stack indices */
    const char *err;
};

/* UTF-8 as Python decodes it with errors='surrogatepass' (encoded surrogates allowed). */
static bool valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t k;
        unsigned char lo = 0x80, hi = 0xbf;
        if (c < 0x80) { i++; continue; }
        else if (c >= 0xc2 && c <= 0xdf) k = 1;
        else if (c >= 0xe0 && c <= 0xef) { k = 2; if (c == 0xe0) lo = 0xa0; }
        else if (c >= 0xf0 && c <= 0xf4) { k = 3; if (c == 0xf0) lo = 0x90; if (c == 0xf4) hi = 0x8f; }
        else return false;
        if (n - i <= k)
            return false;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return false;
        for (size_t j = 2; j <= k; j++)
            if (s[i + j] < 0x80 || s[i + j] > 0xbf)
                return false;
        i += k + 1;
    }
    return true;
}

static void json_ws(struct json *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static bool json_lit(struct json *j, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
        return false;
    j->p += n;
    return true;
}

static int hex4(const unsigned char *p)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int c = p[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v << 4 | d;
    }
    return v;
}

static void add_utf8(luaL_Buffer *b, unsigned cp)
{
    char u[4];
    int n;
    if (cp < 0x80) { u[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (char)(0xc0 | cp >> 6); u[1] = (char)(0x80 | (cp & 0x3f)); n = 2; }
    else if (cp < 0x10000) {    /* a lone surrogate too, as Python keeps it */
        u[0] = (char)(0xe0 | cp >> 12); u[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f)); n = 3;
    } else {
        u[0] = (char)(0xf0 | cp >> 18); u[1] = (char)(0x80 | (cp >> 12 & 0x3f));
        u[2] = (char)(0x80 | (cp >> 6 & 0x3f)); u[3] = (char)(0x80 | (cp & 0x3f)); n = 4;
    }
    luaL_addlstring(b, u, (size_t)n);
}

/* At the opening quote; pushes the string. */
static int json_string(struct json *j)
{
    luaL_Buffer b;
    luaL_buffinit(j->L, &b);
    j->p++;
    for (;;) {
        const unsigned char *run = j->p;
        while (j->p < j->end && *j->p != '"' && *j->p != '\\' && *j->p >= 0x20)
            j->p++;
        luaL_addlstring(&b, (const char *)run, (size_t)(j->p - run));
        if (j->p >= j->end) {
            j->err = "unterminated string";
            goto fail;
        }
        if (*j->p == '"') {
            j->p++;
            luaL_pushresult(&b);
            return 0;
        }
        if (*j->p < 0x20) {
            j->err = "invalid control character in a string";
            goto fail;
        }
        if (j->end - j->p < 2) {
            j->err = "unterminated string";
            goto fail;
        }
        unsigned char e = j->p[1];
        j->p += 2;
        switch (e) {
        case '"': luaL_addchar(&b, '"'); break;
        case '\\': luaL_addchar(&b, '\\'); break;
        case '/': luaL_addchar(&b, '/'); break;
        case 'b': luaL_addchar(&b, '\b'); break;
        case 'f': luaL_addchar(&b, '\f'); break;
        case 'n': luaL_addchar(&b, '\n'); break;
        case 'r': luaL_addchar(&b, '\r'); break;
        case 't': luaL_addchar(&b, '\t'); break;
        case 'u': {
            int cp = j->end - j->p >= 4 ? hex4(j->p) : -1;
            if (cp < 0) {
                j->err = "invalid \\uXXXX escape";
                goto fail;
            }
            j->p += 4;
            unsigned u = (unsigned)cp;
            /* a high surrogate followed by an escaped low one is one character */
            if (u >= 0xd800 && u <= 0xdbff && j->end - j->p >= 6 && j->p[0] == '\\' &&
                j->p[1] == 'u') {
                int lo = hex4(j->p + 2);
                if (lo >= 0xdc00 && lo <= 0xdfff) {
                    u = 0x10000 + ((u - 0xd800) << 10) + ((unsigned)lo - 0xdc00);
                    j->p += 6;
                }
            }
            add_utf8(&b, u);
            break;
        }
        default:
            j->err = "invalid escape";
            goto fail;
        }
    }
fail:
    luaL_pushresult(&b);
    lua_pop(j->L, 1);
    return -1;
}

static bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* Python's number grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)? — an integer
 * without fraction or exponent, a float otherwise. Pushes the number; what follows the
 * longest match is left for the caller to reject. */
static int json_number(struct json *j)
{
    const unsigned char *s = j->p, *p = j->p;
    if (p < j->end && *p == '-')
        p++;
    if (p < j->end && *p == '0')
        p++;
    else if (p < j->end && *p >= '1' && *p <= '9')
        while (p < j->end && is_digit(*p))
            p++;
    else {
        j->err = "expecting a value";
        return -1;
    }
    if (p + 1 < j->end && *p == '.' && is_digit(p[1])) {
        p += 2;
        while (p < j->end && is_digit(*p))
            p++;
    }
    if (p < j->end && (*p == 'e' || *p == 'E')) {
        const unsigned char *q = p + 1;
        if (q < j->end && (*q == '-' || *q == '+'))
            q++;
        if (q < j->end && is_digit(*q)) {     /* otherwise the 'e' is not part of it */
            while (q < j->end && is_digit(*q))
                q++;
            p = q;
        }
    }
    j->p = p;
    /* Lua reads the text the same way: a float with a fraction or an exponent, otherwise
     * an integer (a float when it does not fit 64 bits) */
    lua_State *L = j->L;
    lua_pushlstring(L, (const char *)s, (size_t)(p - s));
    if (lua_stringtonumber(L, lua_tostring(L, -1)) == 0) {
        lua_pop(L, 1);
        j->err = "bad number";
        return -1;
    }
    lua_remove(L, -2);
    return 0;
}

static int json_value(struct json *j);

/* At '{'; pushes the table, its key order recorded in the order table. */
static int json_object(struct json *j)
{
    lua_State *L = j->L;
    luaL_checkstack(L, 8, "callout.jwt: JSON too deep");
    lua_newtable(L);            /* obj */
    lua_newtable(L);            /* its order: [i] = key, [key] = i */
    lua_Integer n = 0;
    j->p++;
    json_ws(j);
    if (j->p < j->end && *j->p == '}') {
        j->p++;
    } else {
        for (;;) {
            if (j->p >= j->end || *j->p != '"') {
                j->err = "expecting a property name in double quotes";
                goto fail;
            }
            if (json_string(j) != 0)
                goto fail;
            json_ws(j);
            if (j->p >= j->end || *j->p != ':') {
                lua_pop(L, 1);
                j->err = "expecting ':'";
                goto fail;
            }
            j->p++;
            json_ws(j);
            if (json_value(j) != 0) {
                lua_pop(L, 1);
                goto fail;
            }
            /* stack: obj order key value. A repeated key keeps its first place and takes
             * the last value, as a Python dict does. */
            lua_pushvalue(L, -2);
            if (lua_rawget(L, -4) == LUA_TNIL) {
                lua_pushvalue(L, -3);
                lua_rawseti(L, -5, ++n);
                lua_pushvalue(L, -3);
                lua_pushinteger(L, n);
                lua_rawset(L, -6);
            }
            lua_pop(L, 1);
            lua_rawset(L, -4);
            json_ws(j);
            if (j->p < j->end && *j->p == '}') {
                j->p++;
                break;
            }
            if (j->p >= j->end || *j->p != ',') {
                j->err = "expecting ',' or '}'";
                goto fail;
            }
            j->p++;
            json_ws(j);
        }
    }
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, j->order);    /* order[obj] = its key order */
    lua_pushvalue(L, j->object_mt);
    lua_setmetatable(L, -2);
    return 0;
fail:
    lua_pop(L, 2);
    return -1;
}

/* At '['; pushes the sequence. */
static int json_array(struct json *j)
{
    lua_State *L = j->L;
    luaL_checkstack(L, 4, "callout.jwt: JSON too deep");
    lua_newtable(L);
    lua_Integer n = 0;
    j->p++;
    json_ws(j);
    if (j->p < j->end && *j->p == ']') {
        j->p++;
    } else {
        for (;;) {
            if (json_value(j) != 0)
                goto fail;
            lua_rawseti(L, -2, ++n);
            json_ws(j);
            if (j->p < j->end && *j->p == ']') {
                j->p++;
                break;
            }
            if (j->p >= j->end || *j->p != ',') {
                j->err = "expecting ',' or ']'";
                goto fail;
            }
            j->p++;
            json_ws(j);
        }
    }
    lua_pushvalue(L, j->array_mt);
    lua_setmetatable(L, -2);
    return 0;
fail:
    lua_pop(L, 1);
    return -1;
}

static int json_value(struct json *j)
{
    if (j->p >= j->end) {
        j->err = "expecting a value";
        return -1;
    }
    if (++j->depth > MAX_DEPTH) {
        j->err = "nested too deeply";
        return -1;
    }
    int rc = 0;
    switch (*j->p) {
    case '{': rc = json_object(j); break;
    case '[': rc = json_array(j); break;
    case '"': rc = json_string(j); break;
    default:
        if (json_lit(j, "null")) pbstruct_push_null(j->L);
        else if (json_lit(j, "true")) lua_pushboolean(j->L, 1);
        else if (json_lit(j, "false")) lua_pushboolean(j->L, 0);
        else if (json_lit(j, "NaN")) lua_pushnumber(j->L, (lua_Number)NAN);
        else if (json_lit(j, "Infinity")) lua_pushnumber(j->L, (lua_Number)HUGE_VAL);
        else if (json_lit(j, "-Infinity")) lua_pushnumber(j->L, -(lua_Number)HUGE_VAL);
        else rc = json_number(j);
    }
    j->depth--;
    return rc;
}

/* Parses s[0..n) as one JSON document (json.loads of bytes: UTF-8, a BOM skipped) and
 * pushes it; on failure pushes nothing and returns the reason. Needs the order table and
 * the metatables at order, order + 1, order + 2. */
static const char *json_decode(lua_State *L, const char *s, size_t n, int order)
{
    const unsigned char *u = (const unsigned char *)s;
    if (n >= 3 && u[0] == 0xef && u[1] == 0xbb && u[2] == 0xbf) {
        u += 3;
        n -= 3;
    }
    if (!valid_utf8(u, n))
        return "not valid UTF-8";
    struct json j = {L, u, u + n, 0, order, order + 1, order + 2, NULL};
    json_ws(&j);
    if (json_value(&j) != 0)
        return j.err;
    json_ws(&j);
    if (j.p != j.end) {
        lua_pop(L, 1);
        return "extra data";
    }
    return NULL;
}

/* pairs() of a decoded object: its keys in token order, then any key a script added.
 * upvalue 1: the order table. */
static int object_next(lua_State *L)
{
    lua_settop(L, 2);
    lua_pushvalue(L, 1);
    lua_rawget(L, lua_upvalueindex(1));     /* 3: the object's key order, or nil */
    bool ordered = lua_istable(L, 3);
    lua_Integer i = 0;
    bool rest = !ordered;
    if (ordered && !lua_isnil(L, 2)) {
        lua_pushvalue(L, 2);
        if (lua_rawget(L, 3) == LUA_TNUMBER)
            i = lua_tointeger(L, -1);
        else
            rest = true;                    /* already past the ordered keys */
        lua_pop(L, 1);
    }
    if (!rest) {
        lua_Integer n = (lua_Integer)lua_rawlen(L, 3);
        for (i++; i <= n; i++) {
            lua_rawgeti(L, 3, i);
            lua_pushvalue(L, -1);
            if (lua_rawget(L, 1) != LUA_TNIL)
                return 2;
            lua_pop(L, 2);
        }
        lua_pushnil(L);
        lua_replace(L, 2);
    }
    lua_pushvalue(L, 2);
    while (lua_next(L, 1) != 0) {
        if (ordered && lua_type(L, -2) == LUA_TSTRING) {
            lua_pushvalue(L, -2);
            bool known = lua_rawget(L, 3) != LUA_TNIL;
            lua_pop(L, 1);
            if (known) {
                lua_pop(L, 1);
                continue;
            }
        }
        return 2;
    }
    lua_pushnil(L);
    return 1;
}

static int object_pairs(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    return 3;
}

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

static bool is_array(lua_State *L, int idx, int array_mt)
{
    if (!lua_getmetatable(L, idx))
        return false;
    bool yes = lua_rawequal(L, -1, array_mt);
    lua_pop(L, 1);
    return yes;
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
static const char *check_claims(lua_State *L, int idx, const struct opts *o, int array_mt)
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
    } else if (lua_type(L, aud) != LUA_TSTRING && !is_array(L, aud, array_mt)) {
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
static const char *check_header(lua_State *L, int h, int array_mt)
{
    const char *why = NULL;
    if (lua_getfield(L, h, "kid") != LUA_TNIL && lua_type(L, -1) != LUA_TSTRING)
        why = "Key ID header parameter must be a string";
    lua_pop(L, 1);
    if (why == NULL && lua_getfield(L, h, "crit") != LUA_TNIL) {
        int c = lua_gettop(L);
        lua_Integer n = is_array(L, c, array_mt) ? (lua_Integer)lua_rawlen(L, c) : 0;
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
    lua_rawgetp(L, LUA_REGISTRYINDEX, &order_key);
    int order = lua_gettop(L);
    luaL_getmetatable(L, OBJECT_MT);
    luaL_getmetatable(L, ARRAY_MT);
    int array_mt = order + 2;

    const char *why = NULL, *jerr;
    char reason[96];
    const char *last = memrchr(tok, '.', len);
    const char *first = last != NULL ? memchr(tok, '.', (size_t)(last - tok)) : NULL;
    if (first == NULL) {
        why = "Not enough segments";
        goto invalid;
    }
    /* 1 token, 2 key, 3 options, order, object_mt, array_mt, then: */
    if (push_b64url(L, tok, (size_t)(first - tok)) != 0) {
        why = "Invalid header padding";
        goto invalid;
    }
    size_t hlen;
    const char *htext = lua_tolstring(L, -1, &hlen);
    if ((jerr = json_decode(L, htext, hlen, order)) != NULL) {
        snprintf(reason, sizeof reason, "Invalid header string: %s", jerr);
        why = reason;
        goto invalid;
    }
    int header = lua_gettop(L);
    if (!lua_istable(L, header) || is_array(L, header, array_mt)) {
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
    if ((why = check_header(L, header, array_mt)) != NULL)
        goto invalid;
    size_t siglen;
    const char *sigbytes = lua_tolstring(L, sig, &siglen);
    if (!verify_rs256(*key, tok, (size_t)(last - tok), sigbytes, siglen)) {
        why = "Signature verification failed";
        goto invalid;
    }
    size_t plen;
    const char *ptext = lua_tolstring(L, payload, &plen);
    if ((jerr = json_decode(L, ptext, plen, order)) != NULL) {
        snprintf(reason, sizeof reason, "Invalid payload string: %s", jerr);
        why = reason;
        goto invalid;
    }
    int claims = lua_gettop(L);
    if (!lua_istable(L, claims) || is_array(L, claims, array_mt)) {
        why = "Invalid payload string: must be a json object";
        goto invalid;
    }
    if ((why = check_claims(L, claims, &o, array_mt)) != NULL)
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
    luaL_getmetatable(L, ARRAY_MT);
    lua_pushboolean(L, lua_type(L, 1) == LUA_TTABLE && is_array(L, 1, lua_gettop(L)));
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
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &order_key) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_createtable(L, 0, 1);
        lua_pushliteral(L, "k");
        lua_setfield(L, -2, "__mode");
        lua_setmetatable(L, -2);
        lua_pushvalue(L, -1);
        lua_rawsetp(L, LUA_REGISTRYINDEX, &order_key);
    }
    if (luaL_newmetatable(L, OBJECT_MT)) {
        lua_pushvalue(L, -2);
        lua_pushcclosure(L, object_next, 1);
        lua_pushcclosure(L, object_pairs, 1);
        lua_setfield(L, -2, "__pairs");
    }
    lua_pop(L, 2);
    luaL_newmetatable(L, ARRAY_MT);
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
