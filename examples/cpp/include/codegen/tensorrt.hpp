#pragma once
// A Session over a TensorRT engine (decoder.engine + engine.json, written by codegen-build-engine or
// codegen-export --engine). Built only with -DCODEGEN_WITH_TENSORRT=ON (TensorRT 10 or 11 and CUDA).

#include "codegen/session.hpp"

#include <filesystem>
#include <memory>

namespace codegen
{

class TensorRTSession : public Session
{
public:
    virtual int64_t eos_token_id() const = 0;
};

// codegen::Error with one line when the folder has no engine, engine.json does not describe one, the engine
// was built by another TensorRT version or for another GPU, or its tensor names are not the decoder's.
// max_context: 0 for the engine's own (options.max_context in engine.json), else at most that.
std::unique_ptr<TensorRTSession> open_tensorrt(std::filesystem::path const& folder, int64_t max_context = 0);

} // namespace codegen
