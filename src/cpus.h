/* cpus.h — how many CPUs this process may use: the default of --threads. */
#ifndef LUACALLOUT_CPUS_H
#define LUACALLOUT_CPUS_H

/* The CPUs the scheduler lets this process run on (sched_getaffinity), lowered to the
 * cgroup's CPU quota when one is set (cgroup v2 cpu.max, or v1 cfs_quota_us/cfs_period_us,
 * rounded up): a container limited to 2 CPUs on a 64-core host gets 2. At least 1, at
 * most 64. */
int cpus_available(void);

/* The whole CPUs a cgroup v2 cpu.max text allows ("200000 100000" -> 2, "150000 100000"
 * -> 2, "max 100000" -> 0 = no limit); 0 for text it cannot read. Pure, for the tests. */
int cpus_from_cpu_max(const char *text);

#endif
