// ONNX Runtime sessions over an export's two graphs (codegen_deploy/runtime/backends/onnxruntime*.py in C++).
//
// Fused graph (decoder_fused.onnx): GroupQueryAttention with one [1, heads, max_context, head_dim] buffer per
// layer and kind, bound by address as both the past input and the present output, so the graph writes each new
// token's key and value in place and a step copies nothing that grows with the context. GQA's inputs:
// seqlens_k = tokens in the cache after this run, minus one; total_sequence_length = that count. Its logits
// are the last token's, [1, vocab]. Every input and output is bound once; a step writes three numbers.
//
// Plain graph (decoder.onnx): the I/O contract of io_spec.py: past_key_values.* in, present.* out (past +
// new tokens), which become the next step's past; ONNX Runtime allocates them.

#include "codegen/error.hpp"
#include "codegen/limits.hpp"
#include "codegen/session.hpp"

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <string_view>

namespace codegen
{
namespace
{

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr char const* kKinds[] = {"key", "value"};

Ort::Env& env()
{
    static Ort::Env instance(ORT_LOGGING_LEVEL_WARNING, "codegen");
    return instance;
}

std::string first_line(char const* what)
{
    std::string s(what);
    return s.substr(0, std::min(s.find('\n'), size_t{300}));
}

ONNXTensorElementDataType element_type(std::string const& dtype)
{
    return dtype == "float16" ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

size_t element_size(std::string const& dtype)
{
    return dtype == "float16" ? 2 : 4;
}

// A tensor's shape as the graph declares it (or a value has it): "[batch, 4, past, 16]".
template <typename Info>
std::string shape_text(Info const& info)
{
    std::vector<int64_t> const dims = info.GetShape();
    std::vector<char const*> names(dims.size(), "");
    info.GetSymbolicDimensions(names.data(), names.size());
    std::string out = "[";
    for (size_t i = 0; i < dims.size(); ++i)
    {
        std::string const name = names[i] && *names[i] ? names[i] : "?";
        out += (i ? ", " : "") + (dims[i] < 0 ? name : std::to_string(dims[i]));
    }
    return out + "]";
}

// An ONNX Runtime session over `graph`, checked against the manifest: the input and output names it lists, the
// cache type it says, and the dimensions this program sizes its buffers by (logits columns, cache heads and head
// width), which are read from the graph itself: a manifest whose vocab_size is larger than the graph's logits
// would otherwise make every step read past them.
Ort::Session open_graph(GraphInfo const& graph, ModelConfig const& config, SessionOptions const& options)
{
    Ort::SessionOptions so;
    if (options.threads > 0)
    {
        so.SetIntraOpNumThreads(options.threads);
        so.SetInterOpNumThreads(1);
    }
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);  // as runtime/ort.py
    std::string const path = graph.file.string();
    try
    {
        Ort::Session session(env(), path.c_str(), so);
        Ort::AllocatorWithDefaultOptions allocator;
        std::vector<std::string> in, out;
        for (size_t i = 0; i < session.GetInputCount(); ++i)
        {
            in.emplace_back(session.GetInputNameAllocated(i, allocator).get());
        }
        for (size_t i = 0; i < session.GetOutputCount(); ++i)
        {
            out.emplace_back(session.GetOutputNameAllocated(i, allocator).get());
        }
        std::string const fix = "the graph does not belong to this manifest, export again";
        check_names(in, graph.inputs, "inputs its manifest lists", path, fix);
        check_names(out, graph.outputs, "outputs its manifest lists", path, fix);
        size_t const past = std::find(in.begin(), in.end(), past_name(0, "key")) - in.begin();
        auto const type = session.GetInputTypeInfo(past).GetTensorTypeAndShapeInfo().GetElementType();
        if (type != element_type(graph.cache_dtype))
        {
            throw Error(path + " has another cache type than the " + graph.cache_dtype + " its manifest says: export again");
        }

        // logits: [batch, seq, vocab] (plain) or [batch * keep, vocab] (fused); every cache tensor:
        // [batch, heads, length, head_dim].
        std::string const says = " its manifest says: " + fix;
        for (size_t i = 0; i < out.size(); ++i)
        {
            if (out[i] != "logits")
            {
                continue;
            }
            Ort::TypeInfo const type_info = session.GetOutputTypeInfo(i);
            auto const info = type_info.GetTensorTypeAndShapeInfo();
            if (info.GetShape().empty() || info.GetShape().back() != config.vocab_size)
            {
                throw Error(path + " has logits " + shape_text(info) + ", not the " + std::to_string(config.vocab_size)
                    + " columns (vocab_size)" + says);
            }
            if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            {
                throw Error(path + " has logits that are not float32 (io_spec.py): " + fix);
            }
        }
        auto check_cache = [&](Ort::TypeInfo const& type_info, std::string const& name) {
            auto const info = type_info.GetTensorTypeAndShapeInfo();
            std::vector<int64_t> const dims = info.GetShape();
            if (dims.size() != 4 || dims[1] != config.n_head || dims[3] != config.head_dim())
            {
                throw Error(path + " has " + name + " " + shape_text(info) + ", not the " + std::to_string(config.n_head)
                    + " heads of " + std::to_string(config.head_dim()) + " (n_head, n_embd / n_head)" + says);
            }
        };
        for (size_t i = 0; i < in.size(); ++i)
        {
            if (in[i].rfind("past_key_values.", 0) == 0)
            {
                check_cache(session.GetInputTypeInfo(i), in[i]);
            }
        }
        for (size_t i = 0; i < out.size(); ++i)
        {
            if (out[i].rfind("present.", 0) == 0)
            {
                check_cache(session.GetOutputTypeInfo(i), out[i]);
            }
        }
        return session;
    }
    catch (Ort::Exception const& e)
    {
        throw Error("ONNX Runtime cannot open " + path + " (" + first_line(e.what()) + "): export again");
    }
}

struct FreeDeleter
{
    void operator()(void* p) const { std::free(p); }
};

class FusedSession : public Session
{
public:
    FusedSession(Export const& exp, SessionOptions const& options)
        : graph_(*exp.fused()), session_(open_graph(graph_, exp.config(), options)), binding_(session_),
          memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault))
    {
        ModelConfig const& c = exp.config();
        vocab_size_ = c.vocab_size;
        max_context_ = c.n_positions;
        Ort::AllocatorWithDefaultOptions allocator;
        // The graph's rotary tables end at its max_context (metadata written by export/fused.py).
        auto meta = session_.GetModelMetadata().LookupCustomMetadataMapAllocated("max_context", allocator);
        if (meta)
        {
            std::string_view const text(meta.get());
            int64_t tokens = 0;
            auto const [end, error] = std::from_chars(text.data(), text.data() + text.size(), tokens);
            if (error != std::errc() || end != text.data() + text.size() || tokens < 1)
            {
                throw Error(graph_.file.string() + " has max_context metadata '" + std::string(text)
                    + "', not a whole number >= 1: the graph is damaged, export again");
            }
            max_context_ = std::min(max_context_, tokens);
        }
        if (options.max_context > 0)
        {
            max_context_ = std::min(max_context_, options.max_context);
        }

        // calloc'd: pages become resident as the cache fills (GQA reads only each row's first seqlens_k + 1).
        int64_t const shape[] = {1, c.n_head, max_context_, c.head_dim()};
        size_t const bytes = static_cast<size_t>(c.n_head * max_context_ * c.head_dim()) * element_size(graph_.cache_dtype);
        for (int layer = 0; layer < c.n_layer; ++layer)
        {
            for (char const* kind : kKinds)
            {
                void* p = std::calloc(bytes, 1);
                if (p == nullptr)
                {
                    throw Error("cannot allocate the KV cache (" + std::to_string(bytes) + " bytes per layer): lower "
                        "--max-context");
                }
                cache_.emplace_back(p);
                Ort::Value v = Ort::Value::CreateTensor(memory_, p, bytes, shape, 4, element_type(graph_.cache_dtype));
                binding_.BindInput(past_name(layer, kind).c_str(), v);
                binding_.BindOutput(present_name(layer, kind).c_str(), v);  // the same memory: written in place
                values_.push_back(std::move(v));
            }
        }
        int64_t const one[] = {1}, ids_shape[] = {1, 1}, logits_shape[] = {1, vocab_size_};
        logits_.resize(vocab_size_);
        seqlens_value_ = Ort::Value::CreateTensor<int32_t>(memory_, &seqlens_, 1, one, 1);
        total_value_ = Ort::Value::CreateTensor<int32_t>(memory_, &total_, 1, nullptr, 0);  // a scalar
        step_ids_value_ = Ort::Value::CreateTensor<int64_t>(memory_, &step_id_, 1, ids_shape, 2);
        logits_value_ = Ort::Value::CreateTensor<float>(memory_, logits_.data(), logits_.size(), logits_shape, 2);
        binding_.BindInput("seqlens_k", seqlens_value_);
        binding_.BindInput("total_sequence_length", total_value_);
        binding_.BindOutput("logits", logits_value_);
        // Graphs that can return several positions per row (speculative steps) take how many: here, the last.
        auto const& in = graph_.inputs;
        if (std::find(in.begin(), in.end(), "logits_to_keep") != in.end())
        {
            keep_value_ = Ort::Value::CreateTensor<int64_t>(memory_, &keep_, 1, one, 1);
            binding_.BindInput("logits_to_keep", keep_value_);
        }
    }

    std::string name() const override { return "onnxruntime-fused"; }

    float const* prefill(std::vector<int64_t> const& ids) override
    {
        check_room(static_cast<int64_t>(ids.size()));
        prompt_ = ids;
        int64_t const shape[] = {1, static_cast<int64_t>(prompt_.size())};
        prompt_value_ = Ort::Value::CreateTensor<int64_t>(memory_, prompt_.data(), prompt_.size(), shape, 2);
        binding_.BindInput("input_ids", prompt_value_);
        seqlens_ = static_cast<int32_t>(prompt_.size()) - 1;
        total_ = static_cast<int32_t>(prompt_.size());
        run();
        binding_.BindInput("input_ids", step_ids_value_);  // every step from now on reads step_id_
        length_ = static_cast<int64_t>(prompt_.size());
        return logits_.data();
    }

    float const* step(int64_t token) override
    {
        check_room(length_ + 1);
        step_id_ = token;
        seqlens_ = static_cast<int32_t>(length_);  // the new token goes at index `length`
        total_ = static_cast<int32_t>(length_ + 1);
        run();
        ++length_;
        return logits_.data();
    }

private:
    void check_room(int64_t tokens) const
    {
        if (tokens < 1 || tokens > max_context_)
        {
            throw Error("the cache holds " + std::to_string(max_context_) + " tokens, this run needs "
                + std::to_string(tokens) + ": shorten the prompt or lower --max-new-tokens");
        }
    }

    void run()
    {
        auto const t0 = Clock::now();
        session_.Run(run_options_, binding_);
        run_s_ += std::chrono::duration<double>(Clock::now() - t0).count();
    }

    GraphInfo graph_;
    Ort::Session session_;
    Ort::IoBinding binding_;
    Ort::MemoryInfo memory_;
    Ort::RunOptions run_options_;
    std::vector<std::unique_ptr<void, FreeDeleter>> cache_;
    std::vector<Ort::Value> values_;
    std::vector<float> logits_;
    std::vector<int64_t> prompt_;
    int32_t seqlens_ = 0, total_ = 0;
    int64_t step_id_ = 0;
    Ort::Value seqlens_value_{nullptr}, total_value_{nullptr}, step_ids_value_{nullptr}, logits_value_{nullptr};
    int64_t keep_ = 1;
    Ort::Value keep_value_{nullptr};
    Ort::Value prompt_value_{nullptr};
};

class PlainSession : public Session
{
public:
    PlainSession(Export const& exp, SessionOptions const& options)
        : graph_(*exp.plain()), session_(open_graph(graph_, exp.config(), options)),
          memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)), config_(exp.config())
    {
        vocab_size_ = config_.vocab_size;
        max_context_ = config_.n_positions;
        if (options.max_context > 0)
        {
            max_context_ = std::min(max_context_, options.max_context);
        }
        in_storage_ = plain_input_names(config_.n_layer);
        out_storage_ = output_names(config_.n_layer);
        for (auto const& n : in_storage_)
        {
            in_names_.push_back(n.c_str());
        }
        for (auto const& n : out_storage_)
        {
            out_names_.push_back(n.c_str());
        }
        ones_.assign(max_context_, 1);
    }

    std::string name() const override { return "onnxruntime-plain"; }

    float const* prefill(std::vector<int64_t> const& ids) override
    {
        int64_t const t = static_cast<int64_t>(ids.size());
        check_room(t);
        // An empty cache: [1, heads, 0, head_dim] tensors (ONNX Runtime needs an address even for no bytes).
        past_.clear();
        int64_t const empty[] = {1, config_.n_head, 0, config_.head_dim()};
        for (size_t i = 0; i < 2 * static_cast<size_t>(config_.n_layer); ++i)
        {
            past_.push_back(Ort::Value::CreateTensor(memory_, &no_bytes_, 0, empty, 4, element_type(graph_.cache_dtype)));
        }
        ids_ = ids;
        positions_.resize(t);
        for (int64_t i = 0; i < t; ++i)
        {
            positions_[i] = i;
        }
        return run(t, 0);
    }

    float const* step(int64_t token) override
    {
        check_room(length_ + 1);
        ids_.assign(1, token);
        positions_.assign(1, length_);
        return run(1, length_);
    }

private:
    void check_room(int64_t tokens) const
    {
        if (tokens < 1 || tokens > max_context_)
        {
            throw Error("the model holds " + std::to_string(max_context_) + " tokens, this run needs "
                + std::to_string(tokens) + ": shorten the prompt or lower --max-new-tokens");
        }
    }

    // Runs ids_ (seq tokens) after `past` cached ones; the present outputs become the cache.
    float const* run(int64_t seq, int64_t past)
    {
        int64_t const total = past + seq;
        int64_t const ids_shape[] = {1, seq}, mask_shape[] = {1, total};
        std::vector<Ort::Value> inputs;
        inputs.reserve(in_names_.size());
        inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory_, ids_.data(), seq, ids_shape, 2));
        inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory_, ones_.data(), total, mask_shape, 2));
        inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory_, positions_.data(), seq, ids_shape, 2));
        for (auto& v : past_)
        {
            inputs.push_back(std::move(v));
        }
        auto const t0 = Clock::now();
        result_ = session_.Run(run_options_, in_names_.data(), inputs.data(), inputs.size(), out_names_.data(),
            out_names_.size());
        run_s_ += std::chrono::duration<double>(Clock::now() - t0).count();
        // The graph's declared logits shape was checked when it opened; what it returned is checked too, as the
        // row read below must lie inside the tensor whatever a graph declares.
        auto const logits = result_[0].GetTensorTypeAndShapeInfo();
        if (logits.GetShape() != std::vector<int64_t>{1, seq, vocab_size_}
            || logits.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        {
            throw Error(graph_.file.string() + " returned logits " + shape_text(logits) + ", not float32 [1, "
                + std::to_string(seq) + ", " + std::to_string(vocab_size_) + "]: the graph is damaged, export again");
        }
        past_.clear();
        for (size_t i = 1; i < result_.size(); ++i)
        {
            past_.push_back(std::move(result_[i]));
        }
        length_ = total;
        return result_[0].GetTensorData<float>() + (seq - 1) * vocab_size_;  // logits [1, seq, vocab]: the last row
    }

    GraphInfo graph_;
    Ort::Session session_;
    Ort::MemoryInfo memory_;
    Ort::RunOptions run_options_;
    ModelConfig config_;
    std::vector<std::string> in_storage_, out_storage_;
    std::vector<char const*> in_names_, out_names_;
    std::vector<Ort::Value> past_, result_;
    std::vector<int64_t> ids_, positions_, ones_;
    int64_t no_bytes_ = 0;
};

} // namespace

std::unique_ptr<Session> open_onnxruntime(Export const& exp, SessionOptions const& options)
{
    std::string const folder = exp.folder().string();
    if (options.threads < 0 || options.threads > limits::max_threads())
    {
        throw Error("threads must be a whole number from 1 to " + std::to_string(limits::max_threads())
            + " (the cores this machine has; 0: ONNX Runtime's default), not " + std::to_string(options.threads));
    }
    if (options.max_context < 0)
    {
        throw Error("max_context must be a whole number >= 1 (0: the model's), not "
            + std::to_string(options.max_context));
    }
    if (options.graph != "auto" && options.graph != "fused" && options.graph != "plain")
    {
        throw Error("unknown graph '" + options.graph + "': choose auto, fused or plain");
    }
    bool const fused = options.graph == "fused" || (options.graph == "auto" && exp.fused());
    if (fused && !exp.fused())
    {
        std::string const why = exp.fused_skipped().empty() ? "" : " (" + exp.fused_skipped() + ")";
        throw Error(folder + " has no fused graph" + why + ": use --graph plain");
    }
    if (!fused && !exp.plain())
    {
        throw Error(folder + " has no plain graph (decoder.onnx): use --graph fused");
    }
    try
    {
        if (fused)
        {
            return std::make_unique<FusedSession>(exp, options);
        }
        return std::make_unique<PlainSession>(exp, options);
    }
    catch (Ort::Exception const& e)
    {
        throw Error("ONNX Runtime cannot set up " + folder + " (" + first_line(e.what()) + "): export again");
    }
}

} // namespace codegen
