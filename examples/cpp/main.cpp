// Load a codegen-deploy TensorRT engine and its engine.json, run a prompt (profile 0, past length 0) and one
// decode step (profile 1), and print the greedy (argmax) token after each.
//
//   codegen_trt_step EXPORT_DIR TOKEN_ID [TOKEN_ID ...]
//
// Written against the TensorRT 10/11 name-based API: setOptimizationProfileAsync, setInputShape,
// setTensorAddress, enqueueV3. Batch 1 for brevity; the engine accepts up to options.max_batch rows.

#include <NvInfer.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace
{

void check(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
    }
}

void require(bool ok, std::string const& what)
{
    if (!ok)
    {
        throw std::runtime_error(what);
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

// A device buffer freed on scope exit. cudaMalloc returns 256-byte aligned memory, as setTensorAddress needs.
struct DeviceBuffer
{
    void* ptr{nullptr};
    explicit DeviceBuffer(size_t bytes)
    {
        check(cudaMalloc(&ptr, std::max<size_t>(bytes, 1)), "cudaMalloc");
    }
    ~DeviceBuffer()
    {
        cudaFree(ptr);
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};

nvinfer1::Dims dims(std::vector<int64_t> const& extents)
{
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(extents.size());
    std::copy(extents.begin(), extents.end(), d.d);
    return d;
}

size_t elementSize(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    default: throw std::runtime_error("unexpected KV cache data type");
    }
}

std::string pastName(int layer, char const* kind)
{
    return "past_key_values." + std::to_string(layer) + "." + kind;
}

std::string presentName(int layer, char const* kind)
{
    return "present." + std::to_string(layer) + "." + kind;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 3)
    {
        std::cerr << "usage: " << argv[0] << " EXPORT_DIR TOKEN_ID [TOKEN_ID ...]\n";
        return 2;
    }
    try
    {
        std::string const dir = argv[1];
        std::vector<int64_t> prompt;
        for (int i = 2; i < argc; ++i)
        {
            prompt.push_back(std::stoll(argv[i]));
        }

        // engine.json: the model's shape, the profiles' limits and the TensorRT version that built the engine.
        std::ifstream manifestFile(dir + "/engine.json");
        require(manifestFile.good(), dir + "/engine.json not found: build it with codegen-build-engine " + dir);
        nlohmann::json const manifest = nlohmann::json::parse(manifestFile);
        auto const& model = manifest.at("model_config");
        int const nLayer = model.at("n_layer");
        int64_t const nHead = model.at("n_head");
        int64_t const headDim = model.at("n_embd").get<int64_t>() / nHead;
        int64_t const vocab = model.at("vocab_size");
        int64_t const maxPrompt = manifest.at("options").at("max_prompt");
        int64_t const maxContext = manifest.at("options").at("max_context");
        int64_t const t = static_cast<int64_t>(prompt.size());
        require(t <= maxPrompt, "the prompt is longer than the engine's max_prompt");
        require(t + 1 <= maxContext, "the prompt leaves no room in the engine's max_context");

        std::string const built = manifest.at("tensorrt_version");
        std::string const here = std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "."
            + std::to_string(NV_TENSORRT_PATCH);
        require(built.rfind(here, 0) == 0,
            "the engine was built with TensorRT " + built + ", this program with " + here + ": rebuild the engine");

        std::ifstream engineFile(dir + "/decoder.engine", std::ios::binary);
        require(engineFile.good(), dir + "/decoder.engine not found");
        std::vector<char> const blob((std::istreambuf_iterator<char>(engineFile)), std::istreambuf_iterator<char>());

        Logger logger;
        std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
        std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(blob.data(), blob.size())};
        require(engine != nullptr, "TensorRT could not deserialize the engine (see its messages above)");
        std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};
        require(context != nullptr, "could not create an execution context");
        cudaStream_t stream;
        check(cudaStreamCreate(&stream), "cudaStreamCreate");

        // Inputs and logits, sized for the largest call; the KV cache as two ping-pong buffers per tensor of
        // max_context tokens: a call reads past from one and writes present (past + new tokens) into the other,
        // and the next call reads that present as its past. Past and present never share memory.
        size_t const kvElement = elementSize(engine->getTensorDataType(pastName(0, "key").c_str()));
        size_t const kvBytes = static_cast<size_t>(nHead * maxContext * headDim) * kvElement;
        DeviceBuffer ids(maxPrompt * sizeof(int64_t)), positions(maxPrompt * sizeof(int64_t));
        DeviceBuffer mask(maxContext * sizeof(int64_t)), logits(maxPrompt * vocab * sizeof(float));
        std::vector<std::unique_ptr<DeviceBuffer>> kv[2];
        for (auto& side : kv)
        {
            for (int i = 0; i < 2 * nLayer; ++i)
            {
                side.push_back(std::make_unique<DeviceBuffer>(kvBytes));
            }
        }

        int src = 0;
        // One engine call: `tokens` new ids after `past` cached tokens; returns the argmax of the last logits.
        auto run = [&](int profile, std::vector<int64_t> const& tokens, int64_t past) -> int64_t {
            int64_t const seq = static_cast<int64_t>(tokens.size());
            int64_t const total = past + seq;
            std::vector<int64_t> pos(seq), ones(total, 1);
            for (int64_t i = 0; i < seq; ++i)
            {
                pos[i] = past + i;
            }
            check(cudaMemcpyAsync(ids.ptr, tokens.data(), seq * sizeof(int64_t), cudaMemcpyHostToDevice, stream), "copy ids");
            check(cudaMemcpyAsync(positions.ptr, pos.data(), seq * sizeof(int64_t), cudaMemcpyHostToDevice, stream), "copy pos");
            check(cudaMemcpyAsync(mask.ptr, ones.data(), total * sizeof(int64_t), cudaMemcpyHostToDevice, stream), "copy mask");

            require(context->setOptimizationProfileAsync(profile, stream), "setOptimizationProfileAsync failed");
            require(context->setInputShape("input_ids", dims({1, seq})), "bad input_ids shape");
            require(context->setInputShape("attention_mask", dims({1, total})), "bad attention_mask shape");
            require(context->setInputShape("position_ids", dims({1, seq})), "bad position_ids shape");
            context->setTensorAddress("input_ids", ids.ptr);
            context->setTensorAddress("attention_mask", mask.ptr);
            context->setTensorAddress("position_ids", positions.ptr);
            context->setTensorAddress("logits", logits.ptr);
            char const* kinds[2] = {"key", "value"};
            for (int layer = 0; layer < nLayer; ++layer)
            {
                for (int k = 0; k < 2; ++k)
                {
                    int const slot = 2 * layer + k;
                    std::string const in = pastName(layer, kinds[k]);
                    require(context->setInputShape(in.c_str(), dims({1, nHead, past, headDim})), "bad past shape");
                    context->setTensorAddress(in.c_str(), kv[src][slot]->ptr);
                    context->setTensorAddress(presentName(layer, kinds[k]).c_str(), kv[1 - src][slot]->ptr);
                }
            }
            require(context->enqueueV3(stream), "enqueueV3 failed (see TensorRT's messages above)");

            std::vector<float> last(vocab);
            char const* lastRow = static_cast<char const*>(logits.ptr) + (seq - 1) * vocab * sizeof(float);
            check(cudaMemcpyAsync(last.data(), lastRow, vocab * sizeof(float), cudaMemcpyDeviceToHost, stream), "copy logits");
            check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
            src = 1 - src;
            return std::distance(last.begin(), std::max_element(last.begin(), last.end()));
        };

        int64_t const first = run(/*profile=*/0, prompt, /*past=*/0);
        std::cout << "prompt of " << t << " tokens -> argmax token " << first << "\n";
        int64_t const second = run(/*profile=*/1, {first}, /*past=*/t);
        std::cout << "decode step with " << first << " -> argmax token " << second << "\n";
        check(cudaStreamDestroy(stream), "cudaStreamDestroy");
        return 0;
    }
    catch (std::exception const& e)
    {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}
