/* cpus.c — the CPUs --threads defaults to. sysconf(_SC_NPROCESSORS_ONLN) counts the host's:
 * in a container limited to 2 CPUs on a large host it would start dozens of workers that
 * share a quota of 2, each paying for its own grpc and Lua. */
#include "cpus.h"

#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CPUS_MAX 64

int cpus_from_cpu_max(const char *text)
{
    char quota[32];
    long long period;
    if (sscanf(text, "%31s %lld", quota, &period) != 2 || period <= 0)
        return 0;
    if (strcmp(quota, "max") == 0)
        return 0;
    char *end;
    long long q = strtoll(quota, &end, 10);
    if (*end != '\0' || q <= 0)
        return 0;
    long long n = (q + period - 1) / period;
    return n > CPUS_MAX ? CPUS_MAX : (int)n;
}

static int read_small(const char *path, char *buf, size_t len)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, len - 1, f);
    fclose(f);
    buf[n] = '\0';
    return n > 0 ? 0 : -1;
}

/* This process's cgroup v2 path ("0::/kubepods/..."), or "" for the root. */
static void own_cgroup(char *out, size_t len)
{
    char buf[4096];
    out[0] = '\0';
    if (read_small("/proc/self/cgroup", buf, sizeof buf) != 0)
        return;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
        if (strncmp(line, "0::", 3) == 0 && strcmp(line + 3, "/") != 0) {
            snprintf(out, len, "%s", line + 3);
            return;
        }
}

static int cgroup_limit(void)
{
    char path[PATH_MAX], text[128], cg[PATH_MAX - 64];
    own_cgroup(cg, sizeof cg);
    /* the process's own cgroup, then the root one (inside a container's cgroup namespace
     * the container's limit is at the root) */
    snprintf(path, sizeof path, "/sys/fs/cgroup%s/cpu.max", cg);
    if (read_small(path, text, sizeof text) == 0 || read_small("/sys/fs/cgroup/cpu.max", text,
                                                               sizeof text) == 0)
        return cpus_from_cpu_max(text);
    char period[64];
    if (read_small("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", text, sizeof text) == 0 &&
        read_small("/sys/fs/cgroup/cpu/cpu.cfs_period_us", period, sizeof period) == 0) {
        char v2[200];
        text[strcspn(text, "\n")] = '\0';
        snprintf(v2, sizeof v2, "%s %s", strcmp(text, "-1") == 0 ? "max" : text, period);
        return cpus_from_cpu_max(v2);
    }
    return 0;
}

int cpus_available(void)
{
    int n = 0;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        n = CPU_COUNT(&set);
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    int limit = cgroup_limit();
    if (limit > 0 && limit < n)
        n = limit;
    return n > CPUS_MAX ? CPUS_MAX : n;
}
