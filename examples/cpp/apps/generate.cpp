// codegen_generate: text (or token ids) in, generated text out, over an export folder: the C++ counterpart of
// `codegen-generate`. Text streams to stdout; timings go to stderr; --json prints one object instead.

#include "codegen/error.hpp"
#include "codegen/export.hpp"
#include "codegen/generate.hpp"
#include "codegen/limits.hpp"
#include "codegen/session.hpp"
#include "codegen/tokenizer.hpp"
#ifdef CODEGEN_WITH_TENSORRT
#include "codegen/tensorrt.hpp"
#endif

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
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
  --seed N                   the same seed (>= 0) gives the same sampled tokens (default: a random seed)
  --threads N                ONNX Runtime intra-op threads, 1 to the cores this machine has
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

// A whole number in [low, high] as `flag`'s value: "-1", "2.5" or "99999999999999999999" is one line that says the
// range (`range` when given, e.g. the cores behind --threads), not wrapped, truncated or taken silently.
template <typename T>
T whole(std::string const& flag, std::string const& text, T low, T high = std::numeric_limits<T>::max(),
    std::string range = "")
{
    T value{};
    auto const [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc() || end != text.data() + text.size() || value < low || value > high)
    {
        if (range.empty())
        {
            range = high == std::numeric_limits<T>::max() ? ">= " + std::to_string(low)
                                                          : "from " + std::to_string(low) + " to " + std::to_string(high);
        }
        throw Error(flag + " must be a whole number " + range + ", not '" + text + "'");
    }
    return value;
}

// A number as `flag`'s value (its range is checked where it is used: codegen::Sampler for the sampling options).
double real(std::string const& flag, std::string const& text)
{
    char* end = nullptr;
    double const value = text.empty() ? 0 : std::strtod(text.c_str(), &end);  // 1e-320 too: tiny is not wrong
    if (text.empty() || end != text.c_str() + text.size())
    {
        throw Error(flag + " needs a number, got '" + text + "'");
    }
    return value;
}

Args parse(int argc, char** argv)
{
    Args a;
    std::vector<std::string> positional;
    int const cores = codegen::limits::max_threads();
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
        else if (arg == "--max-new-tokens") a.max_new_tokens = whole<int>(arg, value(), 1);
        else if (arg == "--temperature") a.temperature = real(arg, value());
        else if (arg == "--top-k") a.top_k = whole<int>(arg, value(), 0);
        else if (arg == "--top-p") a.top_p = real(arg, value());
        else if (arg == "--seed") a.seed = whole<uint64_t>(arg, value(), 0), a.has_seed = true;
        else if (arg == "--threads")
            a.threads = whole<int>(arg, value(), 1, cores,
                "from 1 to " + std::to_string(cores) + " (the cores this machine has)");
        else if (arg == "--max-context") a.max_context = whole<int64_t>(arg, value(), 1, codegen::limits::n_positions);
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
    codegen::Sampler{{a.temperature, a.top_k, a.top_p, 0}};  // one line now for a bad sampling option, not later
    return a;
}

std::vector<int64_t> parse_ids(std::string const& text)
{
    std::vector<int64_t> ids;
    std::istringstream in(text);
    std::string part;
    while (std::getline(in, part, ','))
    {
        ids.push_back(whole<int64_t>("--ids", part, 0, std::numeric_limits<int64_t>::max(),
            "(token ids >= 0, separated by commas)"));
    }
    return ids;
}

// The prompt from `fd` (a file or standard input), at most `limit` bytes read (cli/generate.py read_prompt): one
// byte more tells a longer prompt, which is refused, so /dev/zero or a 64 MB pipe costs `limit` bytes, not all
// memory. `source` names it in messages.
std::string read_bounded(int fd, int64_t limit, std::string const& source)
{
    std::string text;
    char buffer[1 << 16];
    while (static_cast<int64_t>(text.size()) <= limit)
    {
        size_t const want = std::min<size_t>(sizeof buffer, static_cast<size_t>(limit + 1) - text.size());
        ssize_t const n = ::read(fd, buffer, want);
        if (n < 0 && errno == EINTR)
        {
            continue;
        }
        if (n < 0)
        {
            throw Error("cannot read " + source + " (" + std::strerror(errno) + "): check the path");
        }
        if (n == 0)
        {
            return text;
        }
        text.append(buffer, static_cast<size_t>(n));
    }
    throw Error(source + " has more than " + std::to_string(limit) + " bytes, more than a "
        + std::to_string(limit / codegen::limits::prompt_bytes_per_token) + "-token context holds: shorten it");
}

std::string read_prompt_file(std::string const& path, int64_t limit)
{
    std::string const source = "the prompt file " + path;
    int const fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
    {
        throw Error("cannot read " + source + " (" + std::strerror(errno) + "): check the path");
    }
    try
    {
        std::string text = read_bounded(fd, limit, source);
        ::close(fd);
        return text;
    }
    catch (...)
    {
        ::close(fd);
        throw;
    }
}

bool ends_with_replacement(std::string const& s)
{
    return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0;
}

int run(Args const& a)
{
    // The export's manifest first (cheap, and it bounds the prompt), then the prompt, then the session: a bad
    // export or prompt is refused before a graph is loaded.
    std::optional<codegen::Export> exp;
    int64_t context = a.max_context > 0 ? a.max_context : codegen::limits::n_positions;
    if (a.backend == "onnxruntime")
    {
        exp = codegen::Export::open(a.path);
        context = std::min<int64_t>(context, exp->config().n_positions);
    }
    // The tokenizer: needed for text; with --ids only used when there is one (for the text out).
    std::optional<codegen::Tokenizer> tokenizer;
    std::filesystem::path const tok_dir = a.tokenizer.empty() ? a.path : a.tokenizer;
    std::error_code ec;
    if (a.ids.empty() || !a.tokenizer.empty() || std::filesystem::exists(tok_dir / "tokenizer.json", ec)
        || std::filesystem::exists(tok_dir / "vocab.json", ec))
    {
        tokenizer = codegen::Tokenizer::load(tok_dir);
    }

    std::vector<int64_t> prompt;
    if (!a.ids.empty())
    {
        prompt = parse_ids(a.ids);
    }
    else
    {
        std::string text = a.prompt;
        int64_t const limit = context * codegen::limits::prompt_bytes_per_token;
        if (!a.file.empty())
        {
            text = read_prompt_file(a.file, limit);
        }
        else if (!a.has_prompt)
        {
            if (isatty(STDIN_FILENO))
            {
                throw Error("no prompt: give PROMPT, --file, --ids, or pipe it into standard input");
            }
            text = read_bounded(STDIN_FILENO, limit, "standard input");
        }
        prompt = tokenizer->encode(text);
    }

    std::unique_ptr<codegen::Session> session;
    int64_t eos = -1;
    if (exp)
    {
        session = codegen::open_onnxruntime(*exp, {a.threads, a.graph, a.max_context});
        eos = exp->config().eos_token_id;
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
    if (tokenizer)
    {
        eos = tokenizer->eos_token_id();  // as the Python loop: the tokenizer's <|endoftext|>
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

// `message` on one line: a name from a manifest or a path may hold a newline or other control characters.
std::string one_line(std::string message)
{
    for (char& ch : message)
    {
        ch = static_cast<unsigned char>(ch) < 0x20 ? ' ' : ch;
    }
    return message;
}

int main(int argc, char** argv)
{
    try
    {
        return run(parse(argc, argv));
    }
    catch (Error const& e)
    {
        std::cerr << "error: " << one_line(e.what()) << "\n";
        return 2;
    }
    catch (std::filesystem::filesystem_error const& e)
    {
        // A path given on the command line that cannot be looked at (a name too long, no permission).
        std::cerr << "error: cannot read " << one_line(e.path1().string()) << " (" << e.code().message()
                  << "): check the path\n";
        return 2;
    }
    catch (std::exception const& e)
    {
        // ONNX Runtime failing while running, or memory running out: not the user's doing.
        std::cerr << "error: " << one_line(e.what()) << "\n";
        return 1;
    }
}
