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

/* This process's cgroup path for the v2 hierarchy (`0::/kubepods/...`) into v2, and for
 * the v1 hierarchy holding the cpu controller (`4:cpu,cpuacct:/...`) into v1; "" for the
 * root or none. */
static void own_cgroups(char *v2, char *v1, size_t len)
{
    char buf[4096];
    v2[0] = v1[0] = '\0';
    if (read_small("/proc/self/cgroup", buf, sizeof buf) != 0)
        return;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        char *ctl = strchr(line, ':');
        char *path = ctl ? strchr(ctl + 1, ':') : NULL;
        if (!path || strcmp(path + 1, "/") == 0)
            continue;
        *path++ = '\0';
        ctl++;
        if (*ctl == '\0') {
            snprintf(v2, len, "%s", path);
            continue;
        }
        /* the controller list, e.g. "cpu,cpuacct": is "cpu" one of them? */
        for (const char *c = ctl; *c;) {
            size_t n = strcspn(c, ",");
            if (n == 3 && strncmp(c, "cpu", 3) == 0)
                snprintf(v1, len, "%s", path);
            c += n + (c[n] == ',');
        }
    }
}

/* The quota of cgroup v1 folder dir (".../cpu.cfs_quota_us"), as cpus_from_cpu_max. */
static int v1_limit(const char *dir)
{
    char path[PATH_MAX], quota[64], period[64], v2[160];
    snprintf(path, sizeof path, "%s/cpu.cfs_quota_us", dir);
    if (read_small(path, quota, sizeof quota) != 0)
        return -1;
    snprintf(path, sizeof path, "%s/cpu.cfs_period_us", dir);
    if (read_small(path, period, sizeof period) != 0)
        return -1;
    quota[strcspn(quota, "\n")] = '\0';
    snprintf(v2, sizeof v2, "%s %s", strcmp(quota, "-1") == 0 ? "max" : quota, period);
    return cpus_from_cpu_max(v2);
}

static int cgroup_limit(void)
{
    char path[PATH_MAX], text[128], v2[PATH_MAX - 64], v1[PATH_MAX - 64];
    own_cgroups(v2, v1, sizeof v2);
    /* the process's own cgroup, then the root one (inside a container's cgroup namespace
     * the container's limit is at the root) */
    snprintf(path, sizeof path, "/sys/fs/cgroup%s/cpu.max", v2);
    if (read_small(path, text, sizeof text) == 0 ||
        read_small("/sys/fs/cgroup/cpu.max", text, sizeof text) == 0)
        return cpus_from_cpu_max(text);
    static const char *const mounts[] = {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct",
                                         "/sys/fs/cgroup/cpuacct,cpu"};
    for (size_t i = 0; i < sizeof mounts / sizeof *mounts; i++) {
        snprintf(path, sizeof path, "%s%s", mounts[i], v1);
        int n = v1_limit(path);
        if (n < 0 && v1[0])
            n = v1_limit(mounts[i]);
        if (n >= 0)
            return n;
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
