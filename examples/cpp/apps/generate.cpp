// codegen_generate: text (or token ids) in, generated text out, over an export folder: the C++ counterpart of
// `codegen-generate`. Text streams to stdout; timings go to stderr; --json prints one object instead.

#include "codegen/error.hpp"
#include "codegen/export.hpp"
#include "codegen/generate.hpp"
#include "codegen/session.hpp"
#include "codegen/tokenizer.hpp"
#ifdef CODEGEN_WITH_TENSORRT
#include "codegen/tensorrt.hpp"
#endif

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <random>
#include <sstream>

namespace
{

using codegen::Error;

char const* const kUsage = R"(usage: codegen_generate PATH [PROMPT] [options]

PATH is an export folder written by codegen-export. The prompt is PROMPT, --file F, --ids, or standard input.
  --graph auto|fused|plain   which graph (auto: the fused graph when the export has one)
  --ids 1,2,3                token ids instead of text (no tokenizer needed)
  --file F                   read the prompt from F
  --max-new-tokens N         default 128
  --temperature T            0 (default) is greedy
  --top-k K, --top-p P       sampling filters (0 and 1: off)
  --seed N                   the same seed gives the same sampled tokens (default: a random seed)
  --threads N                ONNX Runtime intra-op threads
  --max-context N            cache capacity in tokens (default: the model's)
  --tokenizer DIR            tokenizer files (default: PATH)
  --ignore-eos               always generate --max-new-tokens tokens (for benchmarks)
  --json                     print prompt_ids, ids, text, finish_reason, timings as one JSON object
  --backend onnxruntime|tensorrt   tensorrt: PATH holds decoder.engine + engine.json (TensorRT builds only)
)";

struct Args
{
    std::string path, prompt, file, ids, graph = "auto", tokenizer, backend = "onnxruntime";
    bool has_prompt = false, json = false, ignore_eos = false, has_seed = false;
    int max_new_tokens = 128, threads = 0, top_k = 0;
    int64_t max_context = 0;
    double temperature = 0, top_p = 1;
    uint64_t seed = 0;
};

template <typename T>
T number(std::string const& flag, std::string const& text)
{
    std::istringstream in(text);
    T value{};
    if (!(in >> value) || !in.eof())
    {
        throw Error(flag + " needs a number, got '" + text + "'");
    }
    return value;
}

Args parse(int argc, char** argv)
{
    Args a;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i)
    {
        std::string const arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc)
            {
                throw Error(arg + " needs a value (see --help)");
            }
            return argv[++i];
        };
        if (arg == "-h" || arg == "--help")
        {
            std::cout << kUsage;
            std::exit(0);
        }
        else if (arg == "--graph") a.graph = value();
        else if (arg == "--ids") a.ids = value();
        else if (arg == "--file") a.file = value();
        else if (arg == "--tokenizer") a.tokenizer = value();
        else if (arg == "--backend") a.backend = value();
        else if (arg == "--max-new-tokens") a.max_new_tokens = number<int>(arg, value());
        else if (arg == "--temperature") a.temperature = number<double>(arg, value());
        else if (arg == "--top-k") a.top_k = number<int>(arg, value());
        else if (arg == "--top-p") a.top_p = number<double>(arg, value());
        else if (arg == "--seed") a.seed = number<uint64_t>(arg, value()), a.has_seed = true;
        else if (arg == "--threads") a.threads = number<int>(arg, value());
        else if (arg == "--max-context") a.max_context = number<int64_t>(arg, value());
        else if (arg == "--ignore-eos") a.ignore_eos = true;
        else if (arg == "--json") a.json = true;
        else if (arg.rfind("--", 0) == 0) throw Error("unknown option " + arg + " (see --help)");
        else positional.push_back(arg);
    }
    if (positional.empty() || positional.size() > 2)
    {
        throw Error("give PATH and at most one PROMPT (see --help)");
    }
    a.path = positional[0];
    if (positional.size() == 2)
    {
        a.prompt = positional[1];
        a.has_prompt = true;
    }
    if (a.has_prompt + !a.file.empty() + !a.ids.empty() > 1)
    {
        throw Error("give the prompt once: as PROMPT, --file or --ids");
    }
    return a;
}

std::vector<int64_t> parse_ids(std::string const& text)
{
    std::vector<int64_t> ids;
    std::istringstream in(text);
    std::string part;
    while (std::getline(in, part, ','))
    {
        ids.push_back(number<int64_t>("--ids", part));
    }
    return ids;
}

bool ends_with_replacement(std::string const& s)
{
    return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0;
}

int run(Args const& a)
{
    std::unique_ptr<codegen::Session> session;
    int64_t eos = -1;
    if (a.backend == "onnxruntime")
    {
        codegen::Export const exp = codegen::Export::open(a.path);
        session = codegen::open_onnxruntime(exp, {a.threads, a.graph, a.max_context});
        eos = exp.config().eos_token_id;
    }
#ifdef CODEGEN_WITH_TENSORRT
    else if (a.backend == "tensorrt")
    {
        auto trt = codegen::open_tensorrt(a.path, a.max_context);
        eos = trt->eos_token_id();
        session = std::move(trt);
    }
#endif
    else
    {
        throw Error("unknown backend '" + a.backend + "': this build has onnxruntime"
#ifdef CODEGEN_WITH_TENSORRT
                    " and tensorrt"
#else
                    " only (tensorrt needs -DCODEGEN_WITH_TENSORRT=ON)"
#endif
        );
    }
    // The tokenizer: needed for text; with --ids only used when there is one (for the text out).
    std::optional<codegen::Tokenizer> tokenizer;
    std::filesystem::path const tok_dir = a.tokenizer.empty() ? a.path : a.tokenizer;
    if (a.ids.empty() || !a.tokenizer.empty() || std::filesystem::exists(tok_dir / "tokenizer.json")
        || std::filesystem::exists(tok_dir / "vocab.json"))
    {
        tokenizer = codegen::Tokenizer::load(tok_dir);
    }
    if (tokenizer)
    {
        eos = tokenizer->eos_token_id();  // as the Python loop: the tokenizer's <|endoftext|>
    }

    std::vector<int64_t> prompt;
    if (!a.ids.empty())
    {
        prompt = parse_ids(a.ids);
    }
    else
    {
        std::string text = a.prompt;
        if (!a.file.empty())
        {
            std::ifstream f(a.file, std::ios::binary);
            if (!f)
            {
                throw Error("cannot read the prompt file " + a.file);
            }
            text.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
        }
        else if (!a.has_prompt)
        {
            if (isatty(STDIN_FILENO))
            {
                throw Error("no prompt: give PROMPT, --file, --ids, or pipe it into standard input");
            }
            text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
        }
        prompt = tokenizer->encode(text);
    }
    for (int64_t id : prompt)
    {
        if (id < 0 || id >= session->vocab_size())
        {
            throw Error("token id " + std::to_string(id) + " is outside the vocabulary 0.."
                + std::to_string(session->vocab_size() - 1));
        }
    }

    codegen::GenerationOptions options;
    options.max_new_tokens = a.max_new_tokens;
    options.sampling = {a.temperature, a.top_k, a.top_p, a.has_seed ? a.seed : std::random_device{}()};
    options.eos_token_id = eos;
    options.ignore_eos = a.ignore_eos;

    // Streaming: the decode of every new token so far, printed from where the last print ended, held back
    // while it ends inside a multi-byte character (U+FFFD at the end) or on eos.
    std::vector<int64_t> shown;
    size_t printed = 0;
    auto stream = [&](int64_t token) {
        if (token == eos && !a.ignore_eos)
        {
            return;
        }
        shown.push_back(token);
        std::string const text = tokenizer->decode(shown);
        if (!ends_with_replacement(text) && text.size() > printed)
        {
            std::cout << text.substr(printed) << std::flush;
            printed = text.size();
        }
    };
    bool const streaming = tokenizer && !a.json;
    codegen::Generation const g = codegen::generate(*session, prompt, options,
        streaming ? std::function<void(int64_t)>(stream) : nullptr);

    std::vector<int64_t> text_ids = g.ids;
    if (g.finish_reason == "eos")
    {
        text_ids.pop_back();
    }
    auto const& t = g.timings;
    double const tokens_per_s = t.decode_s > 0 ? t.decode_steps / t.decode_s : 0;
    double const overhead_ms = t.decode_steps ? 1e3 * (t.decode_s - t.decode_run_s) / t.decode_steps : 0;
    if (a.json)
    {
        nlohmann::json out = {
            {"backend", session->name()},
            {"prompt_ids", prompt},
            {"ids", g.ids},
            {"text", tokenizer ? nlohmann::json(tokenizer->decode(text_ids)) : nlohmann::json()},
            {"finish_reason", g.finish_reason},
            {"max_context", session->max_context()},
            {"sampling", {{"temperature", a.temperature}, {"top_k", a.top_k}, {"top_p", a.top_p},
                             {"seed", options.sampling.seed}}},
            {"timings", {{"prefill_s", t.prefill_s}, {"decode_s", t.decode_s}, {"decode_steps", t.decode_steps},
                            {"decode_run_s", t.decode_run_s}, {"decode_tokens_per_s", tokens_per_s},
                            {"step_overhead_ms", overhead_ms}}},
        };
        std::cout << out.dump() << "\n";
        return 0;
    }
    if (streaming)
    {
        std::string const text = tokenizer->decode(text_ids);
        if (text.size() > printed)
        {
            std::cout << text.substr(printed);
        }
        std::cout << "\n";
    }
    else
    {
        for (size_t i = 0; i < g.ids.size(); ++i)
        {
            std::cout << (i ? "," : "") << g.ids[i];
        }
        std::cout << "\n";
    }
    std::fprintf(stderr, "%s: prompt %zu tokens, first token %.3f s, decode %.1f tokens/s (%d steps, %.2f ms/step outside the runtime), %s\n",
        session->name().c_str(), prompt.size(), t.prefill_s, tokens_per_s, t.decode_steps, overhead_ms,
        g.finish_reason.c_str());
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    try
    {
        return run(parse(argc, argv));
    }
    catch (Error const& e)
    {
        std::cerr << "error: " << e.what() << "\n";
        return 2;
    }
    catch (std::exception const& e)
    {
        std::cerr << "error: " << e.what() << "\n";  // ONNX Runtime failing while running: not the user's doing
        return 1;
    }
}
