/* vm.c — reference counting of script generations by the streams that use them. */
#include "vm.h"

#include <stdlib.h>

#include "log.h"
#include "script.h"

struct vm *vm_new(struct script *script, uint64_t generation)
{
    struct vm *vm = calloc(1, sizeof *vm);
    if (vm) {
        vm->script = script;
        vm->generation = generation;
    }
    return vm;
}

void vm_free(struct vm *vm)
{
    if (!vm)
        return;
    script_close(vm->script);
    free(vm);
}

void vm_acquire(struct vm *vm) { vm->streams++; }

void vm_release(struct vm *vm)
{
    if (--vm->streams == 0 && vm->retired) {
        log_debug("closing script generation %llu: its last stream ended",
                  (unsigned long long)vm->generation);
        vm_free(vm);
    }
}

void vm_retire(struct vm *vm)
{
    vm->retired = true;
    if (vm->streams == 0)
        vm_free(vm);
}
