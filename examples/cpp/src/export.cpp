#include "codegen/export.hpp"

#include "codegen/error.hpp"
#include "codegen/limits.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <fstream>

namespace codegen
{
namespace
{

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int kFormatVersion = 1;  // artifacts/manifest.py FORMAT_VERSION
constexpr char const* kKinds[] = {"key", "value"};
// artifacts/manifest.py FILE_KEYS: the entries besides "files" that name a file of the export.
constexpr char const* kFileKeys[] = {"graph_file", "data_file", "fused_graph_file", "fused_data_file",
    "fused_shared_data_file"};

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

// A filesystem query that never throws: a name too long or a loop of links reads as "not there", and the
// caller says what that means for the export in one line.
fs::file_status status_of(fs::path const& p)
{
    std::error_code ec;
    return fs::status(p, ec);
}

bool lexists(fs::path const& p)
{
    std::error_code ec;
    return fs::exists(fs::symlink_status(p, ec));
}

// Whether `real` (a resolved path) is `root` or below it.
bool inside(fs::path const& real, fs::path const& root)
{
    return std::mismatch(root.begin(), root.end(), real.begin(), real.end()).first == root.end();
}

// artifacts/manifest.py check_file_name: a plain relative name inside the export folder (no absolute name, drive,
// backslash, NUL, or '', '.', '..' part). Checked before any file is touched, so a crafted manifest cannot make
// this program read, or report the size of, a file elsewhere.
void check_file_name(json const& rel, std::string const& where, std::string const& key)
{
    bool plain = rel.is_string();
    if (plain)
    {
        std::string const& name = rel.get_ref<std::string const&>();
        bool const drive = name.size() >= 2 && name[1] == ':' && std::isalpha(static_cast<unsigned char>(name[0]));
        plain = !name.empty() && name[0] != '/' && !drive && name.find('\\') == std::string::npos
            && name.find('\0') == std::string::npos;
        for (size_t start = 0; plain;)
        {
            size_t const slash = name.find('/', start);
            std::string const part = name.substr(start, slash == std::string::npos ? slash : slash - start);
            plain = part != "" && part != "." && part != "..";
            if (slash == std::string::npos)
            {
                break;
            }
            start = slash + 1;
        }
    }
    if (!plain)
    {
        std::string const entry = key == "files" ? "a file entry" : "its " + key + " entry";
        throw Error(where + ": " + entry + " names " + rel.dump() + ", not a plain file name inside the export "
            "folder (absolute, or with '..'): the manifest is damaged or made to read other files, export again");
    }
}

// The string entry `key` of `manifest`, `fallback` when it is absent or null; one line when it is something else.
std::string string_entry(json const& manifest, char const* key, std::string const& fallback, std::string const& where)
{
    json const& v = manifest.contains(key) ? manifest[key] : json();
    if (v.is_null())
    {
        return fallback;
    }
    if (!v.is_string())
    {
        throw Error(where + ": '" + key + "' is " + v.dump() + ", not a string: the manifest is damaged, export again");
    }
    return v.get<std::string>();
}

// A whole number of model_config in [low, high] (config.py LIMITS): 2.5, true or 10^8 layers are refused, not
// truncated or allocated for.
int64_t config_number(json const& c, char const* key, int64_t low, int64_t high, std::string const& where)
{
    std::string const fix = "): the manifest is damaged, export again";
    if (!c.contains(key))
    {
        throw Error(where + " has an invalid model_config (no " + key + fix);
    }
    json const& v = c[key];
    if (!v.is_number_integer())
    {
        throw Error(where + " has an invalid model_config (" + key + " is " + v.dump() + ", not a whole number" + fix);
    }
    bool const fits = v.is_number_unsigned() ? v.get<uint64_t>() <= static_cast<uint64_t>(high) : true;
    if (!fits || v.get<int64_t>() < low || v.get<int64_t>() > high)
    {
        std::string const range = high == INT64_MAX ? ">= " + std::to_string(low)
                                                    : std::to_string(low) + " to " + std::to_string(high);
        throw Error(where + " has an invalid model_config (" + key + " " + v.dump() + " is out of range (" + range + ")"
            + fix);
    }
    return v.get<int64_t>();
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
                json const& dtype = e.contains("dtype") ? e["dtype"] : json();  // refused below unless a float type
                g.cache_dtype = dtype.is_string() ? dtype.get<std::string>() : dtype.dump();
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
    try
    {
        return open_checked(folder);
    }
    catch (json::exception const& e)
    {
        // open_checked checks the type of every entry it reads; this is the net under those checks: one line.
        throw Error((folder / "manifest.json").string() + " is damaged (" + e.what() + "): export again");
    }
}

Export Export::open_checked(fs::path const& folder)
{
    if (!fs::is_directory(status_of(folder)))
    {
        throw Error(folder.string() + " is not a folder: give an export folder written by codegen-export");
    }
    fs::path const path = folder / "manifest.json";
    std::string const where = path.string();
    if (!fs::is_regular_file(status_of(path)))
    {
        std::string const hint = fs::is_regular_file(status_of(folder / "engine.json"))
            ? " (it holds a TensorRT engine: run it with --backend tensorrt, built with -DCODEGEN_WITH_TENSORRT=ON)"
            : "";
        throw Error(folder.string() + " has no manifest.json: it is not a finished export (run codegen-export again)"
            + hint);
    }
    std::error_code ec, ec_manifest;
    fs::path const root = fs::canonical(folder, ec);
    fs::path const real_manifest = fs::canonical(path, ec_manifest);
    if (ec || ec_manifest)
    {
        throw Error("cannot resolve " + where + " (" + (ec ? ec : ec_manifest).message() + "): copy the export "
            "folder again");
    }
    if (!inside(real_manifest, root))
    {
        throw Error(where + " is a symbolic link to " + real_manifest.string() + ", outside the export folder: copy "
            "the file itself into it");
    }
    if (fs::file_size(path, ec) > static_cast<uintmax_t>(limits::manifest_bytes) || ec)
    {
        throw Error(where + " has more than " + std::to_string(limits::manifest_bytes) + " bytes, more than a "
            "manifest has: it is not a codegen-deploy export manifest, export again");
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
    if (!manifest.contains("model_config") || !manifest["model_config"].is_object())
    {
        throw Error(where + " has no valid 'model_config' entry: the manifest is damaged, export again");
    }
    json const& mc = manifest["model_config"];
    ModelConfig& c = e.config_;
    c.n_layer = static_cast<int>(config_number(mc, "n_layer", 1, limits::n_layer, where));
    c.n_embd = static_cast<int>(config_number(mc, "n_embd", 1, limits::n_embd, where));
    c.n_head = static_cast<int>(config_number(mc, "n_head", 1, limits::n_head, where));
    c.n_positions = static_cast<int>(config_number(mc, "n_positions", 1, limits::n_positions, where));
    c.vocab_size = static_cast<int>(config_number(mc, "vocab_size", 1, limits::vocab_size, where));
    c.eos_token_id = mc.contains("eos_token_id") ? config_number(mc, "eos_token_id", 0, INT64_MAX, where) : 50256;
    if (c.n_embd % c.n_head != 0)
    {
        throw Error(where + " has an invalid model_config (n_embd " + std::to_string(c.n_embd)
            + " is not divisible by n_head " + std::to_string(c.n_head) + "): the manifest is damaged, export again");
    }

    // Every file name first (the listed ones, and those the entries name), before any file is touched.
    if (!manifest.contains("files") || !manifest["files"].is_object())
    {
        throw Error(where + " has no valid 'files' entry: the manifest is damaged, export again");
    }
    json const& files = manifest["files"];
    for (auto const& [rel, entry] : files.items())
    {
        check_file_name(rel, where, "files");
        if (!entry.is_object() || !entry.contains("bytes") || !entry["bytes"].is_number_integer()
            || !entry.contains("sha256") || !entry["sha256"].is_string())
        {
            throw Error(where + ": the entry of " + rel + " lacks bytes or sha256: the manifest is damaged");
        }
    }
    for (char const* key : kFileKeys)
    {
        if (manifest.contains(key) && !manifest[key].is_null())
        {
            check_file_name(manifest[key], where, key);
        }
    }
    bool const plain = manifest.contains("inputs");
    std::string const graph_file = string_entry(manifest, "graph_file", "decoder.onnx", where);
    std::string const fused_file = string_entry(manifest, "fused_graph_file", "", where);

    // Every file this program opens from the folder must be listed, so that its name, its links and its size are
    // checked (artifacts/manifest.py required_files and check_listed; here the tokenizer's files too, whose
    // error messages quote them). The graphs' external data ONNX Runtime itself keeps inside the graph's folder.
    std::vector<std::pair<std::string, std::string>> needed;  // (file, what reads it)
    auto need = [&](std::string const& rel, char const* what) {
        if (!rel.empty() && std::none_of(needed.begin(), needed.end(), [&](auto const& n) { return n.first == rel; }))
        {
            needed.emplace_back(rel, what);
        }
    };
    if (plain)
    {
        need(graph_file, "the plain graph");
        need(string_entry(manifest, "data_file", "", where), "the plain graph");
        for (char const* name : {"decoder.onnx", "decoder.onnx.data"})
        {
            need(lexists(folder / name) ? name : "", "the plain graph");
        }
    }
    if (!fused_file.empty())
    {
        need(fused_file, "the fused graph");
        need(string_entry(manifest, "fused_data_file", "", where), "the fused graph");
        need(string_entry(manifest, "fused_shared_data_file", "", where), "the fused graph");
        need(lexists(folder / "decoder_fused.onnx.data") ? "decoder_fused.onnx.data" : "", "the fused graph");
    }
    for (char const* name : {"tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json"})
    {
        need(lexists(folder / name) ? name : "", "the tokenizer");
    }
    for (auto const& [rel, what] : needed)
    {
        if (!files.contains(rel))
        {
            throw Error(where + " does not list " + rel + ", which " + what + " reads, so it cannot be checked: the "
                "manifest was edited or damaged, export again");
        }
    }

    // Every listed file inside the folder (a link leaving it is refused), present, with its recorded size: a
    // truncated copy stops here, not inside ONNX Runtime.
    for (auto const& [rel, entry] : files.items())
    {
        fs::path const f = folder / rel;
        fs::path const real = fs::weakly_canonical(f, ec);
        if (ec)
        {
            throw Error("cannot resolve " + f.string() + " (" + ec.message() + "): copy the export folder again");
        }
        if (!inside(real, root))
        {
            throw Error(f.string() + " is a symbolic link to " + real.string() + ", outside the export folder: a "
                "runtime reads only files inside it; copy the files themselves into it (cp -L, or hf download "
                "--local-dir), not links to them");
        }
        if (!fs::is_regular_file(status_of(f)))
        {
            throw Error(f.string() + " is missing from the export: copy the whole folder or export again");
        }
        uintmax_t const size = fs::file_size(f, ec);
        if (ec || entry["bytes"].get<int64_t>() < 0 || size != entry["bytes"].get<uintmax_t>())
        {
            throw Error(f.string() + " has " + std::to_string(size) + " bytes, the manifest says "
                + entry["bytes"].dump() + ": the file is truncated or changed, copy it again or export again");
        }
    }

    std::string const layers = std::to_string(c.n_layer) + "-layer decoder's ";
    std::string const fix = "the manifest or the graph was changed, export again";
    if (plain)
    {
        GraphInfo g = read_graph(manifest, folder / graph_file, "inputs", "outputs", where);
        check_names(g.inputs, plain_input_names(c.n_layer), layers + "inputs", where + " (inputs)", fix);
        check_names(g.outputs, output_names(c.n_layer), layers + "outputs", where + " (outputs)", fix);
        e.plain_ = std::move(g);
    }
    if (!fused_file.empty())
    {
        GraphInfo g = read_graph(manifest, folder / fused_file, "fused_inputs", "fused_outputs", where);
        // Graphs written before logits_to_keep existed lack it: both are served.
        bool const keep = std::find(g.inputs.begin(), g.inputs.end(), "logits_to_keep") != g.inputs.end();
        check_names(g.inputs, fused_input_names(c.n_layer, keep), layers + "inputs", where + " (fused_inputs)", fix);
        check_names(g.outputs, output_names(c.n_layer), layers + "outputs", where + " (fused_outputs)", fix);
        e.fused_ = std::move(g);
        e.fused_weights_ = string_entry(manifest, "fused_weights", "float", where);
    }
    e.fused_skipped_ = string_entry(manifest, "fused_skipped", "", where);
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
