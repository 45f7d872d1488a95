/* errpath.c — see errpath.h. */
#include "errpath.h"

#include <stdbool.h>
#include <stdio.h>

size_t errpath_push(struct errpath *p, const char *fmt, ...)
{
    size_t old = p->len;
    if (p->len < sizeof p->buf - 1) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(p->buf + p->len, sizeof p->buf - p->len, fmt, ap);
        va_end(ap);
        if (n > 0)
            p->len += (size_t)n < sizeof p->buf - p->len ? (size_t)n : sizeof p->buf - 1 - p->len;
    }
    return old;
}

void errpath_restore(struct errpath *p, size_t old)
{
    p->len = old;
    p->buf[old] = '\0';
}

static bool is_identifier(const char *s, size_t len)
{
    if (len == 0 || (s[0] >= '0' && s[0] <= '9'))
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!(ch == '_' || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              (ch >= '0' && ch <= '9')))
            return false;
    }
    return true;
}

size_t errpath_push_key(struct errpath *p, const char *key, size_t len)
{
    if (is_identifier(key, len))
        return errpath_push(p, "%s%.*s", p->len ? "." : "", (int)(len > 64 ? 64 : len), key);
    char buf[68];
    size_t n = len > 64 ? 64 : len;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)key[i];
        buf[i] = (ch < 0x20 || ch == 0x7f || ch == '"') ? '?' : (char)ch;
    }
    buf[n] = '\0';
    return errpath_push(p, "[\"%s%s\"]", buf, len > 64 ? "..." : "");
}

int errpath_vfail(const struct errpath *p, char *err, size_t errlen, const char *fmt, va_list ap)
{
    int n = 0;
    if (p->len > 0)
        n = snprintf(err, errlen, "%s: ", p->buf);
    if (n >= 0 && (size_t)n < errlen)
        vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    return -1;
}
