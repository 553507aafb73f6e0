#include "codegen/export.hpp"

#include "codegen/error.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>

namespace codegen
{
namespace
{

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int kFormatVersion = 1;  // artifacts/manifest.py FORMAT_VERSION
constexpr char const* kKinds[] = {"key", "value"};

std::vector<std::string> cache_names(int n_layer, bool present)
{
    std::vector<std::string> names;
    for (int i = 0; i < n_layer; ++i)
    {
        for (char const* kind : kKinds)
        {
            names.push_back(present ? present_name(i, kind) : past_name(i, kind));
        }
    }
    return names;
}

std::string few(std::vector<std::string> const& names)
{
    std::string out;
    for (size_t i = 0; i < names.size() && i < 3; ++i)
    {
        out += (i ? ", " : "") + names[i];
    }
    if (names.size() > 3)
    {
        out += " and " + std::to_string(names.size() - 3) + " more";
    }
    return out;
}

// The names and the cache dtype of one graph's entries ("inputs"/"outputs" or "fused_inputs"/...).
GraphInfo read_graph(json const& manifest, fs::path const& file, char const* inputs, char const* outputs,
    std::string const& where)
{
    GraphInfo g;
    g.file = file;
    for (auto const& [key, names] : {std::pair{inputs, &g.inputs}, std::pair{outputs, &g.outputs}})
    {
        if (!manifest.contains(key) || !manifest[key].is_array())
        {
            throw Error(where + " has no valid '" + key + "' entry: the manifest is damaged, export again");
        }
        for (json const& e : manifest[key])
        {
            if (!e.is_object() || !e.contains("name") || !e["name"].is_string())
            {
                throw Error(where + ": '" + key + "' is not a list of named tensors: the manifest is damaged");
            }
            names->push_back(e["name"].get<std::string>());
            if (key == inputs && e["name"] == past_name(0, "key"))
            {
                g.cache_dtype = e.value("dtype", "");
            }
        }
    }
    return g;
}

} // namespace

std::string past_name(int layer, char const* kind)
{
    return "past_key_values." + std::to_string(layer) + "." + kind;
}

std::string present_name(int layer, char const* kind)
{
    return "present." + std::to_string(layer) + "." + kind;
}

std::vector<std::string> plain_input_names(int n_layer)
{
    std::vector<std::string> names{"input_ids", "attention_mask", "position_ids"};
    auto past = cache_names(n_layer, false);
    names.insert(names.end(), past.begin(), past.end());
    return names;
}

std::vector<std::string> fused_input_names(int n_layer, bool keep)
{
    std::vector<std::string> names{"input_ids", "seqlens_k", "total_sequence_length"};
    auto past = cache_names(n_layer, false);
    names.insert(names.end(), past.begin(), past.end());
    if (keep)
    {
        names.emplace_back("logits_to_keep");
    }
    return names;
}

std::vector<std::string> output_names(int n_layer)
{
    std::vector<std::string> names{"logits"};
    auto present = cache_names(n_layer, true);
    names.insert(names.end(), present.begin(), present.end());
    return names;
}

void check_names(std::vector<std::string> const& got, std::vector<std::string> const& want, std::string const& what,
    std::string const& where, std::string const& fix)
{
    std::vector<std::string> missing, extra;
    for (auto const& n : want)
    {
        if (std::find(got.begin(), got.end(), n) == got.end())
        {
            missing.push_back(n);
        }
    }
    for (auto const& n : got)
    {
        if (std::find(want.begin(), want.end(), n) == want.end())
        {
            extra.push_back(n);
        }
    }
    if (missing.empty() && extra.empty() && got.size() == want.size())
    {
        return;
    }
    std::string problem;
    if (!missing.empty())
    {
        problem += "missing " + few(missing);
    }
    if (!extra.empty())
    {
        problem += (problem.empty() ? "" : ", ") + std::string("unexpected ") + few(extra);
    }
    if (problem.empty())
    {
        problem = "names repeated";
    }
    throw Error(where + " does not have the " + what + " (" + problem + "): " + fix);
}

Export Export::open(fs::path const& folder)
{
    if (!fs::is_directory(folder))
    {
        throw Error(folder.string() + " is not a folder: give an export folder written by codegen-export");
    }
    fs::path const path = folder / "manifest.json";
    std::string const where = path.string();
    if (!fs::is_regular_file(path))
    {
        std::string const hint = fs::is_regular_file(folder / "engine.json")
            ? " (it holds a TensorRT engine: run it with --backend tensorrt, built with -DCODEGEN_WITH_TENSORRT=ON)"
            : "";
        throw Error(folder.string() + " has no manifest.json: it is not a finished export (run codegen-export again)"
            + hint);
    }
    json manifest;
    try
    {
        std::ifstream file(path, std::ios::binary);
        manifest = json::parse(file);
    }
    catch (json::exception const& e)
    {
        throw Error(where + " is not readable JSON (" + e.what() + "): export again");
    }
    if (!manifest.is_object() || manifest.value("format_version", json()) != kFormatVersion)
    {
        std::string const version = manifest.is_object() ? manifest.value("format_version", json()).dump() : "none";
        throw Error(where + " is not a codegen-deploy export manifest of format version " + std::to_string(kFormatVersion)
            + " (format_version " + version + "): export the model again with codegen-export");
    }

    Export e;
    e.folder_ = folder;
    try
    {
        json const& c = manifest.at("model_config");
        e.config_.n_layer = c.at("n_layer").get<int>();
        e.config_.n_embd = c.at("n_embd").get<int>();
        e.config_.n_head = c.at("n_head").get<int>();
        e.config_.n_positions = c.at("n_positions").get<int>();
        e.config_.vocab_size = c.at("vocab_size").get<int>();
        e.config_.eos_token_id = c.value("eos_token_id", int64_t{50256});
    }
    catch (json::exception const& ex)
    {
        throw Error(where + " has an invalid model_config (" + ex.what() + "): the manifest is damaged, export again");
    }
    ModelConfig const& c = e.config_;
    if (c.n_layer < 1 || c.n_head < 1 || c.n_embd % c.n_head != 0 || c.n_positions < 2 || c.vocab_size < 1)
    {
        throw Error(where + " has an invalid model_config (sizes out of range): the manifest is damaged, export again");
    }

    // Every listed file present with its recorded size: a truncated copy stops here, not inside ONNX Runtime.
    if (!manifest.contains("files") || !manifest["files"].is_object())
    {
        throw Error(where + " has no valid 'files' entry: the manifest is damaged, export again");
    }
    for (auto const& [rel, entry] : manifest["files"].items())
    {
        fs::path const f = folder / rel;
        if (!entry.is_object() || !entry.contains("bytes") || !entry["bytes"].is_number_integer())
        {
            throw Error(where + ": the entry of " + rel + " lacks bytes: the manifest is damaged");
        }
        if (!fs::is_regular_file(f))
        {
            throw Error(f.string() + " is missing from the export: copy the whole folder or export again");
        }
        auto const size = fs::file_size(f);
        if (size != entry["bytes"].get<uintmax_t>())
        {
            throw Error(f.string() + " has " + std::to_string(size) + " bytes, the manifest says "
                + entry["bytes"].dump() + ": the file is truncated or changed, copy it again or export again");
        }
    }

    std::string const layers = std::to_string(c.n_layer) + "-layer decoder's ";
    std::string const fix = "the manifest or the graph was changed, export again";
    if (manifest.contains("inputs"))
    {
        GraphInfo g = read_graph(manifest, folder / manifest.value("graph_file", "decoder.onnx"), "inputs", "outputs",
            where);
        check_names(g.inputs, plain_input_names(c.n_layer), layers + "inputs", where + " (inputs)", fix);
        check_names(g.outputs, output_names(c.n_layer), layers + "outputs", where + " (outputs)", fix);
        e.plain_ = std::move(g);
    }
    if (manifest.value("fused_graph_file", json()).is_string())
    {
        GraphInfo g = read_graph(manifest, folder / manifest["fused_graph_file"].get<std::string>(), "fused_inputs",
            "fused_outputs", where);
        // Graphs written before logits_to_keep existed lack it: both are served.
        bool const keep = std::find(g.inputs.begin(), g.inputs.end(), "logits_to_keep") != g.inputs.end();
        check_names(g.inputs, fused_input_names(c.n_layer, keep), layers + "inputs", where + " (fused_inputs)", fix);
        check_names(g.outputs, output_names(c.n_layer), layers + "outputs", where + " (fused_outputs)", fix);
        e.fused_ = std::move(g);
        e.fused_weights_ = manifest.value("fused_weights", "float");
    }
    if (manifest.value("fused_skipped", json()).is_string())
    {
        e.fused_skipped_ = manifest["fused_skipped"].get<std::string>();
    }
    for (auto const* g : {&e.plain_, &e.fused_})
    {
        if (*g && (*g)->cache_dtype != "float32" && (*g)->cache_dtype != "float16")
        {
            throw Error(where + ": " + (*g)->file.filename().string() + " has a " + (*g)->cache_dtype
                + " cache; this program runs float32 and float16 graphs (bfloat16 needs a GPU)");
        }
    }
    if (!e.plain_ && !e.fused_)
    {
        throw Error(where + " lists no graph (no 'inputs' and no 'fused_graph_file'): export again");
    }
    return e;
}

} // namespace codegen
