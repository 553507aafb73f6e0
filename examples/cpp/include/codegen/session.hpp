#pragma once
// A Session runs the decoder over one row (batch 1) and owns its KV cache, as the Python Sessions do: the
// generation loop sees token ids in and the last position's logits out, so one loop serves every graph.

#include "codegen/export.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace codegen
{

class Session
{
public:
    virtual ~Session() = default;

    // Runs `ids` on an empty cache; the logits [vocab] of the last token (valid until the next call).
    virtual float const* prefill(std::vector<int64_t> const& ids) = 0;
    // Appends one token to the cache; its logits.
    virtual float const* step(int64_t token) = 0;

    virtual std::string name() const = 0;
    int64_t vocab_size() const { return vocab_size_; }
    int64_t max_context() const { return max_context_; }  // tokens the cache holds
    int64_t length() const { return length_; }            // tokens in the cache now
    // Seconds spent inside the runtime's run call (ONNX Runtime's Run, TensorRT's enqueue + sync) so far: the
    // rest of a step's time is this program's own overhead.
    double run_seconds() const { return run_s_; }

protected:
    int64_t vocab_size_ = 0;
    int64_t max_context_ = 0;
    int64_t length_ = 0;
    double run_s_ = 0;
};

struct SessionOptions
{
    int threads = 0;              // ONNX Runtime intra-op threads (0: its default)
    std::string graph = "auto";   // "auto" (fused if the export has one), "fused" or "plain"
    int64_t max_context = 0;      // cache capacity in tokens (0: the model's n_positions)
};

// An ONNX Runtime session (CPU provider) over an export's fused or plain graph; codegen::Error with one line
// when the graph is missing, does not open, or its names or cache type disagree with the manifest.
std::unique_ptr<Session> open_onnxruntime(Export const& exp, SessionOptions const& options);

} // namespace codegen
