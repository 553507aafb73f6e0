#include "codegen/limits.hpp"

#include <thread>

#ifdef __linux__
#include <sched.h>
#endif

namespace codegen::limits
{

int max_threads()
{
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
    {
        return CPU_COUNT(&set);
    }
#endif
    unsigned const cores = std::thread::hardware_concurrency();  // 0 when unknown
    return cores > 0 ? static_cast<int>(cores) : 1;
}

} // namespace codegen::limits
