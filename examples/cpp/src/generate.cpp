#include "codegen/generate.hpp"

#include "codegen/error.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

namespace codegen
{

Sampler::Sampler(Sampling const& s) : s_(s), rng_(s.seed)
{
    if (!(s.temperature >= 0) || !std::isfinite(s.temperature))
    {
        throw Error("temperature must be >= 0 (0 = greedy), got " + std::to_string(s.temperature));
    }
    if (s.top_k < 0)
    {
        throw Error("top_k must be a whole number >= 0 (0 = off), got " + std::to_string(s.top_k));
    }
    if (!(s.top_p > 0 && s.top_p <= 1))
    {
        throw Error("top_p must be in (0, 1] (1 = off), got " + std::to_string(s.top_p));
    }
}

int64_t Sampler::pick(float const* logits, int64_t vocab)
{
    if (s_.temperature == 0)
    {
        return std::max_element(logits, logits + vocab) - logits;  // the first of equal maxima, as numpy
    }
    double const neg_inf = -std::numeric_limits<double>::infinity();
    // (logit - max) / T: the largest becomes 0 and the rest <= 0, so a tiny T (1e-320) sends the others to -inf
    // (weight 0) instead of making every logit +-inf and the weights inf - inf = NaN. The same softmax(logits / T),
    // which as T -> 0 puts all its mass on the largest logits: a tiny T samples as greedy does.
    double const max_logit = *std::max_element(logits, logits + vocab);
    scaled_.assign(logits, logits + vocab);
    for (double& x : scaled_)
    {
        x = (x - max_logit) / s_.temperature;
    }
    if (s_.top_k > 0 && s_.top_k < vocab)
    {
        // Keep the k largest (ties at the k-th value kept too, as runtime/sampling.py).
        std::vector<double> sorted(scaled_);
        std::nth_element(sorted.begin(), sorted.begin() + (s_.top_k - 1), sorted.end(), std::greater<double>());
        double const kth = sorted[s_.top_k - 1];
        for (double& x : scaled_)
        {
            x = x < kth ? neg_inf : x;
        }
    }
    double const top = *std::max_element(scaled_.begin(), scaled_.end());
    if (s_.top_p < 1)
    {
        // The most likely tokens whose probability reaches top_p; the first is always kept.
        order_.resize(vocab);
        std::iota(order_.begin(), order_.end(), 0);
        std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return scaled_[a] > scaled_[b]; });
        double sum = 0;
        for (double x : scaled_)
        {
            sum += std::exp(x - top);
        }
        double before = 0;
        for (int64_t i : order_)
        {
            double const p = std::exp(scaled_[i] - top) / sum;
            if (before >= s_.top_p)
            {
                scaled_[i] = neg_inf;
            }
            before += p;
        }
    }
    // Inverse CDF: the first token whose cumulative weight exceeds u * total.
    double total = 0;
    for (double& x : scaled_)
    {
        x = std::exp(x - top);  // now weights; -inf -> 0
        total += x;
    }
    double const u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * total;  // uniform in [0, total)
    double cdf = 0;
    for (int64_t i = 0; i < vocab; ++i)
    {
        cdf += scaled_[i];
        if (cdf > u && scaled_[i] > 0)
        {
            return i;
        }
    }
    // Rounding left u at the very top: the last token with any weight.
    for (int64_t i = vocab - 1; i >= 0; --i)
    {
        if (scaled_[i] > 0)
        {
            return i;
        }
    }
    return 0;
}

Generation generate(Session& session, std::vector<int64_t> const& prompt, GenerationOptions const& options,
    std::function<void(int64_t)> const& on_token)
{
    using Clock = std::chrono::steady_clock;
    if (prompt.empty())
    {
        throw Error("the prompt is empty: give some text (or ids)");
    }
    if (options.max_new_tokens < 1)
    {
        throw Error("--max-new-tokens must be at least 1, got " + std::to_string(options.max_new_tokens));
    }
    int64_t const need = static_cast<int64_t>(prompt.size()) + options.max_new_tokens;
    if (need > session.max_context())
    {
        throw Error("the prompt (" + std::to_string(prompt.size()) + " tokens) plus " + std::to_string(options.max_new_tokens)
            + " new tokens exceeds the context of " + std::to_string(session.max_context())
            + " tokens: shorten the prompt or lower --max-new-tokens");
    }
    Sampler sampler(options.sampling);
    Generation g;
    int64_t const vocab = session.vocab_size();
    auto const t0 = Clock::now();
    int64_t token = sampler.pick(session.prefill(prompt), vocab);
    g.timings.prefill_s = std::chrono::duration<double>(Clock::now() - t0).count();
    double const run_before = session.run_seconds();
    auto const decode_start = Clock::now();
    for (int n = 1;; ++n)
    {
        g.ids.push_back(token);
        if (on_token)
        {
            on_token(token);
        }
        if (token == options.eos_token_id && !options.ignore_eos)
        {
            g.finish_reason = "eos";
            break;
        }
        if (n == options.max_new_tokens)
        {
            g.finish_reason = "length";
            break;
        }
        token = sampler.pick(session.step(token), vocab);
        g.timings.decode_steps = n;
        g.timings.decode_s = std::chrono::duration<double>(Clock::now() - decode_start).count();
    }
    g.timings.decode_run_s = session.run_seconds() - run_before;
    return g;
}

} // namespace codegen
