#pragma once
// An export folder written by codegen-export, read through its manifest.json: the model's shape, the graphs
// it has (plain decoder.onnx with past-key-value I/O; fused decoder_fused.onnx with the cache written in
// place) and their input/output names, checked against the names the decoder must have (as
// codegen_deploy/artifacts/io_spec.py declares them), and the size of every listed file.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace codegen
{

struct ModelConfig
{
    int n_layer = 0;
    int n_embd = 0;
    int n_head = 0;
    int n_positions = 0;
    int vocab_size = 0;  // logits columns (the embedding's rows, >= the tokenizer's ids)
    int64_t eos_token_id = -1;
    int head_dim() const { return n_embd / n_head; }
};

// One ONNX graph of an export, as its manifest records it.
struct GraphInfo
{
    std::filesystem::path file;
    std::vector<std::string> inputs, outputs;  // names in graph order
    std::string cache_dtype;                   // "float32" or "float16"
};

// The graph names of io_spec.py.
std::string past_name(int layer, char const* kind);     // past_key_values.{layer}.{key|value}
std::string present_name(int layer, char const* kind);  // present.{layer}.{key|value}
std::vector<std::string> plain_input_names(int n_layer);
std::vector<std::string> fused_input_names(int n_layer, bool keep = true);  // keep: with logits_to_keep
std::vector<std::string> output_names(int n_layer);

// codegen::Error (one line) unless `got` has the names of `want` (in any order); where: what is checked.
void check_names(std::vector<std::string> const& got, std::vector<std::string> const& want, std::string const& what,
    std::string const& where, std::string const& fix);

class Export
{
public:
    // Reads and checks manifest.json: format version, model config (within config.py's LIMITS), file names (plain
    // names inside the folder, every file this program reads listed, no link leaving the folder), graphs' names,
    // file sizes (sha256 is not checked here: codegen-generate --verify sha256 does that). codegen::Error with one
    // line otherwise.
    static Export open(std::filesystem::path const& folder);

    std::filesystem::path const& folder() const { return folder_; }
    ModelConfig const& config() const { return config_; }
    std::optional<GraphInfo> const& plain() const { return plain_; }
    std::optional<GraphInfo> const& fused() const { return fused_; }
    std::string const& fused_skipped() const { return fused_skipped_; }  // why the export has no fused graph
    std::string const& fused_weights() const { return fused_weights_; }  // "float", "int8" or "int4"

private:
    static Export open_checked(std::filesystem::path const& folder);

    std::filesystem::path folder_;
    ModelConfig config_;
    std::optional<GraphInfo> plain_, fused_;
    std::string fused_skipped_, fused_weights_;
};

} // namespace codegen
