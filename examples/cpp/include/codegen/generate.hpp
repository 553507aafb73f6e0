#pragma once
// The generation loop over any Session: prefill -> pick -> step -> pick ... until eos or max_new_tokens, as
// codegen_deploy/runtime/generate.py runs it for one row. Greedy picks the first largest logit (numpy's argmax),
// so greedy tokens equal the Python runtime's on the same graph. Sampling (temperature, top-k, top-p) draws from
// std::mt19937_64 seeded by the caller: the same seed gives the same tokens on every run and platform (the
// engine's output sequence is fixed by the C++ standard), though not the Python runtime's numpy stream.

#include "codegen/session.hpp"

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace codegen
{

struct Sampling
{
    double temperature = 0;  // 0: greedy
    int top_k = 0;           // 0: off
    double top_p = 1;        // 1: off
    uint64_t seed = 0;
};

class Sampler
{
public:
    explicit Sampler(Sampling const& s);
    int64_t pick(float const* logits, int64_t vocab);

private:
    Sampling s_;
    std::mt19937_64 rng_;
    std::vector<double> scaled_;
    std::vector<int64_t> order_;
};

struct GenerationOptions
{
    int max_new_tokens = 128;
    Sampling sampling;
    int64_t eos_token_id = -1;  // stop after this token (not with ignore_eos)
    bool ignore_eos = false;    // for benchmarks: always max_new_tokens
};

struct Timings
{
    double prefill_s = 0;     // prompt run + first pick (time to first token)
    double decode_s = 0;      // from the first token to the last
    double decode_run_s = 0;  // of decode_s, inside the runtime's run call
    int decode_steps = 0;
};

struct Generation
{
    std::vector<int64_t> ids;  // new tokens, an ending eos included
    std::string finish_reason;  // "eos" or "length"
    Timings timings;
};

// codegen::Error when the prompt is empty or prompt + max_new_tokens exceeds the session's context.
// on_token: called with each new token as it is picked (for streaming).
Generation generate(Session& session, std::vector<int64_t> const& prompt, GenerationOptions const& options,
    std::function<void(int64_t)> const& on_token = nullptr);

} // namespace codegen
