/* test_cpus.c — the default of --threads: cgroup quotas read right, never more than the
 * CPUs this process may run on. */
#include <sched.h>

#include "check.h"
#include "cpus.h"

int main(void)
{
    CHECK(cpus_from_cpu_max("200000 100000\n") == 2);
    CHECK(cpus_from_cpu_max("150000 100000") == 2);    /* 1.5 CPUs: rounded up */
    CHECK(cpus_from_cpu_max("50000 100000") == 1);     /* half a CPU still needs a worker */
    CHECK(cpus_from_cpu_max("max 100000\n") == 0);     /* no limit */
    CHECK(cpus_from_cpu_max("100000000 1000") == 64);  /* capped like --threads */
    CHECK(cpus_from_cpu_max("") == 0);
    CHECK(cpus_from_cpu_max("garbage") == 0);
    CHECK(cpus_from_cpu_max("12x 100000") == 0);
    CHECK(cpus_from_cpu_max("-5 100000") == 0);
    CHECK(cpus_from_cpu_max("100000 0") == 0);

    cpu_set_t set;
    CHECK(sched_getaffinity(0, sizeof set, &set) == 0);
    int n = cpus_available();
    CHECK(n >= 1 && n <= CPU_COUNT(&set));

    /* one CPU allowed: one worker, whatever the host has */
    cpu_set_t one;
    CPU_ZERO(&one);
    for (int i = 0; i < CPU_SETSIZE; i++)
        if (CPU_ISSET(i, &set)) {
            CPU_SET(i, &one);
            break;
        }
    CHECK(sched_setaffinity(0, sizeof one, &one) == 0);
    CHECK(cpus_available() == 1);
    CHECK(sched_setaffinity(0, sizeof set, &set) == 0);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
