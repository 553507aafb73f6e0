#pragma once
// The bounds every input is held to, mirrored in one place from the Python side, so a manifest or a command line
// made to exhaust the machine (2 x 10^8 graph names, a /dev/zero prompt, 100,000 threads) is one line instead.

#include <cstdint>

namespace codegen::limits
{

// codegen_deploy/config.py LIMITS: the largest model dimensions a config may give (far above any CodeGen's).
constexpr int64_t n_layer = 1024;
constexpr int64_t n_embd = 65536;
constexpr int64_t n_head = 1024;
constexpr int64_t n_positions = 262144;
constexpr int64_t vocab_size = 1048576;

// codegen_deploy/cli/generate.py PROMPT_BYTES_PER_TOKEN: CodeGen's longest token is 128 bytes of UTF-8, so a prompt
// longer than its context times this cannot fit and no more than that is read.
constexpr int64_t prompt_bytes_per_token = 128;

// A manifest.json larger than this is not one (a 1,024-layer export's is ~2 MB): refused before it is parsed.
constexpr int64_t manifest_bytes = 64 << 20;

// codegen_deploy/config.py max_threads(): the logical cores this process may run on (sched_getaffinity, else
// std::thread::hardware_concurrency). More threads only wait for each other, and a mistyped 100000 would make
// ONNX Runtime start tens of thousands.
int max_threads();

} // namespace codegen::limits
