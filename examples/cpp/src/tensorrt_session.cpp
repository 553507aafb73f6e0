// A TensorRT engine as a Session (codegen_deploy/runtime/backends/tensorrt.py in C++, batch 1).
//
// The engine has the plain graph's I/O (past_key_values.* in, present.* out) and two optimisation profiles
// (artifacts/engine.py): 0 "prompt" (seq 1..max_prompt, past 0) and 1 "decode" (seq 1, past 1..max_context-1).
// The KV cache lives in two ping-pong device buffers per tensor, max_context tokens each: a call reads past from
// one and writes present (past + new tokens) into the other, and the next call reads that as its past, so a step
// copies nothing that grows with the context. Prompts longer than max_prompt run their tail token by token in the
// decode profile, as the Python session does. Written against TensorRT's name-based API (10 and 11).

#include "codegen/tensorrt.hpp"

#include "codegen/error.hpp"

#include <NvInfer.h>
#include <cuda_runtime_api.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <iterator>

namespace codegen
{
namespace
{

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;
constexpr char const* kKinds[] = {"key", "value"};
constexpr int kPromptProfile = 0, kDecodeProfile = 1;

void check(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        throw std::runtime_error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(status));
    }
}

class Logger : public nvinfer1::ILogger
{
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::cerr << "[tensorrt] " << msg << "\n";
        }
    }
};

// A device buffer freed on scope exit (cudaMalloc's 256-byte alignment is what setTensorAddress needs).
struct DeviceBuffer
{
    void* ptr = nullptr;
    explicit DeviceBuffer(size_t bytes) { check(cudaMalloc(&ptr, std::max<size_t>(bytes, 1)), "cudaMalloc"); }
    ~DeviceBuffer() { cudaFree(ptr); }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};

nvinfer1::Dims dims(std::initializer_list<int64_t> extents)
{
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(extents.size());
    std::copy(extents.begin(), extents.end(), d.d);
    return d;
}

size_t element_size(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kBF16: return 2;
    default: throw Error("the engine's KV cache has a data type this program does not know: rebuild the engine");
    }
}

class Engine : public TensorRTSession
{
public:
    Engine(fs::path const& folder, int64_t max_context)
    {
        fs::path const manifest_path = folder / "engine.json", engine_path = folder / "decoder.engine";
        std::string const rebuild = "rebuild it on this machine with: codegen-build-engine EXPORT_DIR";
        if (!fs::is_regular_file(engine_path))
        {
            throw Error(folder.string() + " has no decoder.engine: build one with codegen-build-engine EXPORT_DIR");
        }
        json manifest;
        try
        {
            std::ifstream f(manifest_path, std::ios::binary);
            manifest = json::parse(f);
        }
        catch (json::exception const& e)
        {
            throw Error(manifest_path.string() + " is missing or not readable JSON (" + e.what() + "): " + rebuild);
        }
        if (!manifest.is_object() || manifest.value("kind", "") != "tensorrt-engine")
        {
            throw Error(manifest_path.string() + " does not describe a TensorRT engine: " + rebuild);
        }
        try
        {
            json const& c = manifest.at("model_config");
            n_layer_ = c.at("n_layer").get<int>();
            n_head_ = c.at("n_head").get<int64_t>();
            head_dim_ = c.at("n_embd").get<int64_t>() / n_head_;
            vocab_size_ = c.at("vocab_size").get<int64_t>();
            eos_ = c.value("eos_token_id", int64_t{50256});
            max_prompt_ = manifest.at("options").at("max_prompt").get<int64_t>();
            max_context_ = manifest.at("options").at("max_context").get<int64_t>();
            auto const bytes = manifest.at("files").at("decoder.engine").at("bytes").get<uintmax_t>();
            if (fs::file_size(engine_path) != bytes)
            {
                throw Error(engine_path.string() + " has " + std::to_string(fs::file_size(engine_path))
                    + " bytes, engine.json says " + std::to_string(bytes) + ": copy it again or " + rebuild);
            }
            // The TensorRT version and the GPU the engine was built for (artifacts/engine.py's checks).
            std::string const built = manifest.at("tensorrt_version").get<std::string>();
            int const v = getInferLibVersion();  // major * 10000 + minor * 100 + patch
            std::string const here = std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "."
                + std::to_string(v % 100);
            if (built != here && built.rfind(here + ".", 0) != 0)
            {
                throw Error("the engine was built with TensorRT " + built + ", this machine runs TensorRT " + here + ": "
                    + rebuild);
            }
            cudaDeviceProp prop{};
            check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
            std::string const cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
            json const& gpu = manifest.at("gpu");
            if (gpu.value("compute_capability", "") != cc || gpu.value("name", "") != prop.name)
            {
                throw Error("the engine was built for a " + gpu.value("name", "?") + " (compute capability "
                    + gpu.value("compute_capability", "?") + "), this GPU is a " + prop.name + " (compute capability "
                    + cc + "): " + rebuild);
            }
        }
        catch (json::exception const& e)
        {
            throw Error(manifest_path.string() + " lacks what the engine needs (" + e.what() + "): " + rebuild);
        }
        if (max_context > 0)
        {
            max_context_ = std::min(max_context_, max_context);
        }

        std::ifstream file(engine_path, std::ios::binary);
        std::vector<char> const blob((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
        runtime_.reset(nvinfer1::createInferRuntime(logger_));
        engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
        if (!engine_)
        {
            throw Error("TensorRT could not deserialize " + engine_path.string() + " (see its messages above): " + rebuild);
        }
        std::vector<std::string> names;
        for (int i = 0; i < engine_->getNbIOTensors(); ++i)
        {
            names.emplace_back(engine_->getIOTensorName(i));
        }
        std::vector<std::string> want = plain_input_names(n_layer_), out = output_names(n_layer_);
        want.insert(want.end(), out.begin(), out.end());
        check_names(names, want, std::to_string(n_layer_) + "-layer decoder's tensors", engine_path.string(), rebuild);
        if (engine_->getNbOptimizationProfiles() != 2)
        {
            throw Error(engine_path.string() + " does not have the prompt and decode profiles: " + rebuild);
        }
        context_.reset(engine_->createExecutionContext());
        if (!context_)
        {
            throw std::runtime_error("TensorRT could not create an execution context");
        }
        check(cudaStreamCreate(&stream_), "cudaStreamCreate");

        size_t const kv_bytes = static_cast<size_t>(n_head_ * max_context_ * head_dim_)
            * element_size(engine_->getTensorDataType(past_name(0, "key").c_str()));
        ids_ = std::make_unique<DeviceBuffer>(max_prompt_ * sizeof(int64_t));
        positions_ = std::make_unique<DeviceBuffer>(max_prompt_ * sizeof(int64_t));
        mask_ = std::make_unique<DeviceBuffer>(max_context_ * sizeof(int64_t));
        logits_ = std::make_unique<DeviceBuffer>(max_prompt_ * vocab_size_ * sizeof(float));
        for (auto& side : kv_)
        {
            for (int i = 0; i < 2 * n_layer_; ++i)
            {
                side.push_back(std::make_unique<DeviceBuffer>(kv_bytes));
            }
        }
        std::vector<int64_t> const ones(max_context_, 1);
        check(cudaMemcpy(mask_->ptr, ones.data(), ones.size() * sizeof(int64_t), cudaMemcpyHostToDevice), "copy mask");
        host_logits_.resize(vocab_size_);
    }

    ~Engine() override
    {
        if (stream_)
        {
            cudaStreamDestroy(stream_);
        }
    }

    std::string name() const override { return "tensorrt"; }
    int64_t eos_token_id() const override { return eos_; }

    float const* prefill(std::vector<int64_t> const& ids) override
    {
        int64_t const t = static_cast<int64_t>(ids.size());
        if (t < 1 || t > max_context_)
        {
            throw Error("the engine holds " + std::to_string(max_context_) + " tokens, the prompt has "
                + std::to_string(t) + ": shorten it");
        }
        int64_t const head = std::min(t, max_prompt_);
        src_ = 0;
        run(kPromptProfile, std::vector<int64_t>(ids.begin(), ids.begin() + head), 0);
        for (int64_t i = head; i < t; ++i)
        {
            run(kDecodeProfile, {ids[i]}, i);
        }
        length_ = t;
        return host_logits_.data();
    }

    float const* step(int64_t token) override
    {
        if (length_ + 1 > max_context_)
        {
            throw Error("the engine holds " + std::to_string(max_context_) + " tokens: lower --max-new-tokens");
        }
        run(kDecodeProfile, {token}, length_);
        ++length_;
        return host_logits_.data();
    }

private:
    // One engine call: `tokens` after `past` cached ones; leaves the last token's logits in host_logits_.
    void run(int profile, std::vector<int64_t> const& tokens, int64_t past)
    {
        int64_t const seq = static_cast<int64_t>(tokens.size());
        std::vector<int64_t> positions(seq);
        for (int64_t i = 0; i < seq; ++i)
        {
            positions[i] = past + i;
        }
        auto const t0 = Clock::now();
        check(cudaMemcpyAsync(ids_->ptr, tokens.data(), seq * sizeof(int64_t), cudaMemcpyHostToDevice, stream_), "ids");
        check(cudaMemcpyAsync(positions_->ptr, positions.data(), seq * sizeof(int64_t), cudaMemcpyHostToDevice, stream_),
            "positions");
        if (profile != profile_)
        {
            if (!context_->setOptimizationProfileAsync(profile, stream_))
            {
                throw std::runtime_error("TensorRT refused optimisation profile " + std::to_string(profile));
            }
            profile_ = profile;
        }
        bool ok = context_->setInputShape("input_ids", dims({1, seq}))
            && context_->setInputShape("attention_mask", dims({1, past + seq}))  // the ones written at start-up
            && context_->setInputShape("position_ids", dims({1, seq}));
        ok = ok && context_->setTensorAddress("input_ids", ids_->ptr) && context_->setTensorAddress("attention_mask", mask_->ptr)
            && context_->setTensorAddress("position_ids", positions_->ptr) && context_->setTensorAddress("logits", logits_->ptr);
        for (int layer = 0; layer < n_layer_; ++layer)
        {
            for (int k = 0; k < 2; ++k)
            {
                std::string const in = past_name(layer, kKinds[k]), out = present_name(layer, kKinds[k]);
                ok = ok && context_->setInputShape(in.c_str(), dims({1, n_head_, past, head_dim_}))
                    && context_->setTensorAddress(in.c_str(), kv_[src_][2 * layer + k]->ptr)
                    && context_->setTensorAddress(out.c_str(), kv_[1 - src_][2 * layer + k]->ptr);
            }
        }
        if (!ok || !context_->enqueueV3(stream_))
        {
            throw std::runtime_error("TensorRT refused the call (seq " + std::to_string(seq) + ", past "
                + std::to_string(past) + "; see its messages above)");
        }
        char const* last = static_cast<char const*>(logits_->ptr) + (seq - 1) * vocab_size_ * sizeof(float);
        check(cudaMemcpyAsync(host_logits_.data(), last, vocab_size_ * sizeof(float), cudaMemcpyDeviceToHost, stream_),
            "logits");
        check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        run_s_ += std::chrono::duration<double>(Clock::now() - t0).count();
        src_ = 1 - src_;
    }

    Logger logger_;
    std::unique_ptr<nvinfer1::IRuntime> runtime_;
    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::unique_ptr<nvinfer1::IExecutionContext> context_;
    cudaStream_t stream_ = nullptr;
    int n_layer_ = 0;
    int64_t n_head_ = 0, head_dim_ = 0, max_prompt_ = 0, eos_ = -1;
    int profile_ = -1, src_ = 0;
    std::unique_ptr<DeviceBuffer> ids_, positions_, mask_, logits_;
    std::vector<std::unique_ptr<DeviceBuffer>> kv_[2];
    std::vector<float> host_logits_;
};

} // namespace

std::unique_ptr<TensorRTSession> open_tensorrt(fs::path const& folder, int64_t max_context)
{
    return std::make_unique<Engine>(folder, max_context);
}

} // namespace codegen
