/* vm.h — one generation of the script on one worker: the script's Lua VM plus the count of
 * streams still running on it. A reload gives every worker a new vm; the old one is
 * retired and closed when its last stream ends, so a stream never sees two scripts.
 *
 * vm_new may run on any thread; everything else runs only on the owning worker's thread. */
#ifndef LUACALLOUT_VM_H
#define LUACALLOUT_VM_H

#include <stdbool.h>
#include <stdint.h>

struct script;

struct vm {
    struct script *script;
    uint64_t generation;
    int streams;      /* streams started on this vm and not yet ended */
    bool retired;     /* a newer generation took over: close at streams == 0 */
};

struct vm *vm_new(struct script *script, uint64_t generation);
/* Closes the script and frees the vm; only for a vm no stream ever used or one that is
 * retired with no stream left. */
void vm_free(struct vm *vm);
void vm_acquire(struct vm *vm);
void vm_release(struct vm *vm);
void vm_retire(struct vm *vm);

#endif
