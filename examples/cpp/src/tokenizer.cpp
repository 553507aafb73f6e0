#include "codegen/tokenizer.hpp"

#include "codegen/error.hpp"
#include "unicode.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <fstream>
#include <queue>
#include <sstream>

namespace codegen
{
namespace
{

namespace fs = std::filesystem;
using nlohmann::json;

constexpr char const* kEosToken = "<|endoftext|>";

// GPT-2's bytes -> printable characters (openai/gpt-2 encoder.py bytes_to_unicode): printable Latin-1 bytes
// stand for themselves, the other 68 bytes take the characters from U+0100 on, in byte order.
struct ByteChars
{
    std::array<char32_t, 256> of_byte{};
    std::array<int, 512> byte_of{};  // -1 for characters that are not a byte's
    std::array<std::string, 256> utf8{};

    ByteChars()
    {
        byte_of.fill(-1);
        char32_t next = 0x100;
        for (int b = 0; b < 256; ++b)
        {
            bool const printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            of_byte[b] = printable ? static_cast<char32_t>(b) : next++;
            byte_of[of_byte[b]] = b;
            unicode::append_utf8(utf8[b], of_byte[b]);
        }
    }
};

ByteChars const& byte_chars()
{
    static ByteChars const table;
    return table;
}

json read_json(fs::path const& path)
{
    std::ifstream file(path, std::ios::binary);
    if (!file)
    {
        throw Error(path.string() + " cannot be read: check the file's permissions, or copy the tokenizer again");
    }
    try
    {
        return json::parse(file);
    }
    catch (json::exception const& e)
    {
        throw Error(path.string() + " is not readable JSON (" + e.what() + "): re-download it");
    }
}

// The length in code points of GPT-2's regex match at cps[i] (see tokenizer.hpp). Every code point is a letter,
// a number, white space or "other", so some alternative always matches.
size_t regex_match(std::vector<char32_t> const& cps, size_t i)
{
    using namespace unicode;
    size_t const n = cps.size();
    char32_t const c = cps[i];
    auto other = [](char32_t x) { return !is_space(x) && !is_letter(x) && !is_number(x); };
    // 's|'t|'re|'ve|'m|'ll|'d (case-sensitive, ASCII apostrophe only)
    if (c == '\'' && i + 1 < n)
    {
        char32_t const a = cps[i + 1];
        if (a == 's' || a == 't' || a == 'm' || a == 'd')
        {
            return 2;
        }
        if (i + 2 < n)
        {
            char32_t const b = cps[i + 2];
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
            {
                return 3;
            }
        }
    }
    //  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+ : an optional leading space, then a run of one class.
    for (auto cls : {+[](char32_t x) { return is_letter(x); }, +[](char32_t x) { return is_number(x); }})
    {
        size_t start = (c == ' ' && i + 1 < n && cls(cps[i + 1])) ? i + 1 : i;
        if (cls(cps[start]))
        {
            size_t j = start;
            while (j < n && cls(cps[j]))
            {
                ++j;
            }
            return j - i;
        }
    }
    {
        size_t start = (c == ' ' && i + 1 < n && other(cps[i + 1])) ? i + 1 : i;
        if (other(cps[start]))
        {
            size_t j = start;
            while (j < n && other(cps[j]))
            {
                ++j;
            }
            return j - i;
        }
    }
    // \s+(?!\S) | \s+ : a white-space run, less its last character when text follows it (that character
    // then starts the next piece, e.g. " word"), unless the run is that one character.
    size_t j = i;
    while (j < n && is_space(cps[j]))
    {
        ++j;
    }
    if (j == n || j - i == 1)
    {
        return j - i;
    }
    return j - 1 - i;
}

// The regex's pieces of `text` (valid UTF-8), as views into it.
void regex_split(std::string_view text, std::vector<std::string_view>& out)
{
    std::vector<char32_t> cps;
    std::vector<size_t> offsets;
    unicode::decode(text, cps, offsets);
    for (size_t i = 0; i < cps.size();)
    {
        size_t const len = regex_match(cps, i);
        out.push_back(text.substr(offsets[i], offsets[i + len] - offsets[i]));
        i += len;
    }
}

uint64_t pair_key(int32_t left, int32_t right)
{
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// A tokenizer.json setting this code does not implement: refuse it rather than tokenize differently.
[[noreturn]] void unsupported(std::string const& where, std::string const& what)
{
    throw Error(where + " uses " + what + ", which this C++ tokenizer does not implement: it reads CodeGen's "
        "byte-level BPE tokenizers only (use the Python tokenizer for others)");
}

} // namespace

void Tokenizer::add_merge(std::string const& left, std::string const& right, uint32_t rank, std::string const& where)
{
    auto a = vocab_.find(left), b = vocab_.find(right), merged = vocab_.find(left + right);
    if (a == vocab_.end() || b == vocab_.end() || merged == vocab_.end())
    {
        throw Error(where + ": the merge \"" + left + " " + right + "\" names a token the vocab does not have: "
            "re-download the tokenizer");
    }
    // A pair listed twice keeps its last rank, as tokenizers' merge map does.
    merges_[pair_key(a->second, b->second)] = MergeResult{rank, merged->second};
}

void Tokenizer::add_token(AddedToken token)
{
    if (token.id < 0)
    {
        throw Error("the added token \"" + token.content + "\" has a negative id: re-download the tokenizer");
    }
    if (static_cast<size_t>(token.id) >= id_to_token_.size())
    {
        id_to_token_.resize(token.id + 1);
    }
    id_to_token_[token.id] = token.content;  // added tokens come first when ids are decoded
    added_.push_back(std::move(token));
}

void Tokenizer::finish(std::string const& where)
{
    auto const& chars = byte_chars();
    for (int b = 0; b < 256; ++b)
    {
        auto it = vocab_.find(chars.utf8[b]);
        if (it == vocab_.end())
        {
            unsupported(where, "a vocab without every byte's character (not a byte-level BPE vocab)");
        }
        byte_id_[b] = it->second;
    }
    // Longest first, so the first token that matches at a position is the longest one there.
    std::stable_sort(added_.begin(), added_.end(),
        [](AddedToken const& x, AddedToken const& y) { return x.content.size() > y.content.size(); });
    for (auto const& t : added_)
    {
        if (t.content == kEosToken)
        {
            eos_ = t.id;
        }
    }
    if (eos_ < 0 && vocab_.count(kEosToken))
    {
        eos_ = vocab_.at(kEosToken);
    }
    if (eos_ < 0)
    {
        throw Error("the tokenizer in " + where + " has no " + kEosToken + " token: is it a CodeGen tokenizer?");
    }
}

Tokenizer Tokenizer::load(fs::path const& folder)
{
    Tokenizer tok;
    fs::path const tokenizer_json = folder / "tokenizer.json";
    fs::path const vocab_json = folder / "vocab.json", merges_txt = folder / "merges.txt";
    if (fs::is_regular_file(tokenizer_json))
    {
        std::string const where = tokenizer_json.string();
        json const j = read_json(tokenizer_json);
        try
        {
            if (!j.value("normalizer", json()).is_null())
            {
                unsupported(where, "a normalizer");
            }
            json const& pre = j.at("pre_tokenizer");
            if (pre.is_null() || pre.value("type", "") != "ByteLevel" || pre.value("add_prefix_space", false)
                || !pre.value("use_regex", true))
            {
                unsupported(where, "a pre-tokenizer other than ByteLevel(add_prefix_space=false, use_regex=true)");
            }
            json const& decoder = j.at("decoder");
            if (decoder.is_null() || decoder.value("type", "") != "ByteLevel")
            {
                unsupported(where, "a decoder other than ByteLevel");
            }
            json const& model = j.at("model");
            if (model.value("type", "BPE") != "BPE")
            {
                unsupported(where, "a " + model.value("type", "") + " model");
            }
            for (char const* key : {"continuing_subword_prefix", "end_of_word_suffix"})
            {
                if (model.contains(key) && !model[key].is_null() && model[key] != "")
                {
                    unsupported(where, std::string("a BPE ") + key);
                }
            }
            if (model.contains("dropout") && !model["dropout"].is_null())
            {
                unsupported(where, "BPE dropout");
            }
            if (model.value("byte_fallback", false))
            {
                unsupported(where, "BPE byte_fallback");
            }
            tok.ignore_merges_ = model.value("ignore_merges", false);
            for (auto const& [token, id] : model.at("vocab").items())
            {
                int32_t const i = id.get<int32_t>();
                tok.vocab_[token] = i;
                if (static_cast<size_t>(i) >= tok.id_to_token_.size())
                {
                    tok.id_to_token_.resize(i + 1);
                }
                tok.id_to_token_[i] = token;
            }
            uint32_t rank = 0;
            for (json const& m : model.at("merges"))
            {
                std::string left, right;
                if (m.is_array() && m.size() == 2)  // tokenizers >= 0.20 writes pairs
                {
                    left = m[0].get<std::string>();
                    right = m[1].get<std::string>();
                }
                else
                {
                    std::string const s = m.get<std::string>();  // older files: "left right"
                    size_t const space = s.find(' ');
                    if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
                    {
                        throw Error(where + ": the merge \"" + s + "\" is not two tokens: re-download it");
                    }
                    left = s.substr(0, space);
                    right = s.substr(space + 1);
                }
                tok.add_merge(left, right, rank++, where);
            }
            for (json const& a : j.at("added_tokens"))
            {
                if (a.value("single_word", false) || a.value("lstrip", false) || a.value("rstrip", false))
                {
                    unsupported(where, "an added token with single_word, lstrip or rstrip");
                }
                tok.add_token({a.at("content").get<std::string>(), a.at("id").get<int32_t>(),
                    a.value("normalized", true)});
            }
        }
        catch (json::exception const& e)
        {
            throw Error(where + " is not a tokenizers file this program understands (" + e.what()
                + "): re-download it");
        }
        tok.finish(folder.string());
        return tok;
    }
    if (fs::is_regular_file(vocab_json) && fs::is_regular_file(merges_txt))
    {
        // As codegen_deploy.model.tokenizer builds it: BPE + ByteLevel, <|endoftext|> special, then the entries
        // of added_tokens.json in id order, each taking the next free id (which must be the id it names).
        json const v = read_json(vocab_json);
        try
        {
            for (auto const& [token, id] : v.items())
            {
                int32_t const i = id.get<int32_t>();
                tok.vocab_[token] = i;
                if (static_cast<size_t>(i) >= tok.id_to_token_.size())
                {
                    tok.id_to_token_.resize(i + 1);
                }
                tok.id_to_token_[i] = token;
            }
        }
        catch (json::exception const& e)
        {
            throw Error(vocab_json.string() + " is not a vocab ({token: id}) (" + e.what() + "): re-download it");
        }
        std::ifstream merges(merges_txt, std::ios::binary);
        std::string line;
        uint32_t rank = 0;
        while (std::getline(merges, line))
        {
            if (line.rfind("#version", 0) == 0 || line.empty())
            {
                continue;
            }
            size_t const space = line.find(' ');
            if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos)
            {
                throw Error(merges_txt.string() + ": line \"" + line + "\" is not two tokens: re-download it");
            }
            tok.add_merge(line.substr(0, space), line.substr(space + 1), rank++, merges_txt.string());
        }
        int32_t const model_size = static_cast<int32_t>(tok.vocab_.size());
        int32_t max_added = -1;
        auto add = [&](std::string const& content, bool normalized) -> int32_t {
            auto it = tok.vocab_.find(content);
            int32_t id = it != tok.vocab_.end() ? it->second : (max_added >= model_size ? max_added + 1 : model_size);
            for (auto const& a : tok.added_)
            {
                if (a.content == content)
                {
                    id = a.id;
                }
            }
            max_added = std::max(max_added, id);
            tok.add_token({content, id, normalized});
            return id;
        };
        add(kEosToken, false);
        fs::path const added_json = folder / "added_tokens.json";
        if (fs::is_regular_file(added_json))
        {
            json const added = read_json(added_json);
            std::vector<std::pair<int32_t, std::string>> by_id;
            try
            {
                for (auto const& [content, id] : added.items())
                {
                    by_id.emplace_back(id.get<int32_t>(), content);
                }
            }
            catch (json::exception const& e)
            {
                throw Error(added_json.string() + " is not {token: id} (" + e.what() + "): re-download it");
            }
            std::sort(by_id.begin(), by_id.end());
            for (auto const& [want, content] : by_id)
            {
                int32_t const got = add(content, true);
                if (got != want)
                {
                    throw Error(added_json.string() + ": token \"" + content + "\" should have id " + std::to_string(want)
                        + " but got " + std::to_string(got));
                }
            }
        }
        tok.finish(folder.string());
        return tok;
    }
    if (!fs::is_directory(folder))
    {
        throw Error(folder.string() + " is not a folder: give a folder with tokenizer.json or vocab.json + merges.txt");
    }
    throw Error(folder.string() + " has no tokenizer.json and no vocab.json + merges.txt: copy the tokenizer files "
        "into it (or pass --tokenizer FOLDER)");
}

std::vector<Tokenizer::Segment> Tokenizer::split_added(std::string_view text) const
{
    std::vector<Segment> parts{{text, -1}};
    // Two passes as in tokenizers' AddedVocabulary: tokens matched on the raw text (special ones), then tokens
    // matched on the normalized text (there is no normalizer, so the same text), each leftmost-longest.
    for (bool normalized : {false, true})
    {
        std::vector<Segment> next;
        for (Segment const& part : parts)
        {
            if (part.added_id >= 0)
            {
                next.push_back(part);
                continue;
            }
            std::string_view const s = part.text;
            size_t start = 0;  // of the text not yet emitted
            for (size_t i = 0; i < s.size();)
            {
                AddedToken const* found = nullptr;
                for (AddedToken const& t : added_)  // longest first
                {
                    if (t.normalized == normalized && !t.content.empty()
                        && s.compare(i, t.content.size(), t.content) == 0)
                    {
                        found = &t;
                        break;
                    }
                }
                if (found == nullptr)
                {
                    ++i;
                    continue;
                }
                if (start < i)
                {
                    next.push_back({s.substr(start, i - start), -1});
                }
                next.push_back({s.substr(i, found->content.size()), found->id});
                i += found->content.size();
                start = i;
            }
            if (start < s.size())
            {
                next.push_back({s.substr(start), -1});
            }
        }
        parts = std::move(next);
    }
    return parts;
}

void Tokenizer::bpe(std::string_view piece, std::vector<int64_t>& out) const
{
    auto const& chars = byte_chars();
    if (ignore_merges_)
    {
        std::string word;
        for (unsigned char b : piece)
        {
            word += chars.utf8[b];
        }
        auto it = vocab_.find(word);
        if (it != vocab_.end())
        {
            out.push_back(it->second);
            return;
        }
    }
    // tokenizers' Word::merge_all: a min-heap of (rank, position) candidates; a popped candidate whose pair
    // has changed since it was pushed is skipped; each merge pushes the pairs it forms with its neighbours.
    struct Symbol
    {
        int32_t id;
        int32_t prev, next;
        size_t len;  // bytes; 0 once merged into its left neighbour
    };
    struct Candidate
    {
        uint32_t rank;
        size_t pos;
        int32_t id;
        bool operator>(Candidate const& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    size_t const n = piece.size();
    std::vector<Symbol> symbols(n);
    for (size_t i = 0; i < n; ++i)
    {
        symbols[i] = {byte_id_[static_cast<unsigned char>(piece[i])], static_cast<int32_t>(i) - 1,
            i + 1 < n ? static_cast<int32_t>(i + 1) : -1, 1};
    }
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    auto push = [&](size_t pos, int32_t left, int32_t right) {
        auto it = merges_.find(pair_key(left, right));
        if (it != merges_.end())
        {
            queue.push({it->second.rank, pos, it->second.id});
        }
    };
    for (size_t i = 0; i + 1 < n; ++i)
    {
        push(i, symbols[i].id, symbols[i + 1].id);
    }
    while (!queue.empty())
    {
        Candidate const top = queue.top();
        queue.pop();
        Symbol& cur = symbols[top.pos];
        if (cur.len == 0 || cur.next == -1)
        {
            continue;
        }
        Symbol const right = symbols[cur.next];
        auto it = merges_.find(pair_key(cur.id, right.id));
        if (it == merges_.end() || it->second.id != top.id)
        {
            continue;  // stale: one of the pair was merged with something else first
        }
        symbols[cur.next].len = 0;
        cur.id = top.id;
        cur.len += right.len;
        cur.next = right.next;
        if (right.next >= 0)
        {
            symbols[right.next].prev = static_cast<int32_t>(top.pos);
        }
        if (cur.prev >= 0)
        {
            push(cur.prev, symbols[cur.prev].id, cur.id);
        }
        if (cur.next >= 0)
        {
            push(top.pos, cur.id, symbols[cur.next].id);
        }
    }
    for (Symbol const& s : symbols)
    {
        if (s.len != 0)
        {
            out.push_back(s.id);
        }
    }
}

std::vector<int64_t> Tokenizer::encode(std::string_view text) const
{
    std::string const valid = unicode::to_valid_utf8(text);
    std::vector<int64_t> ids;
    std::vector<std::string_view> pieces;
    for (Segment const& seg : split_added(valid))
    {
        if (seg.added_id >= 0)
        {
            ids.push_back(seg.added_id);
            continue;
        }
        pieces.clear();
        regex_split(seg.text, pieces);
        for (std::string_view piece : pieces)
        {
            bpe(piece, ids);
        }
    }
    return ids;
}

std::vector<std::string> Tokenizer::pretokenize(std::string_view text) const
{
    std::string const valid = unicode::to_valid_utf8(text);
    std::vector<std::string> out;
    std::vector<std::string_view> pieces;
    for (Segment const& seg : split_added(valid))
    {
        if (seg.added_id >= 0)
        {
            out.emplace_back(seg.text);
            continue;
        }
        pieces.clear();
        regex_split(seg.text, pieces);
        out.insert(out.end(), pieces.begin(), pieces.end());
    }
    return out;
}

std::string Tokenizer::decode(std::vector<int64_t> const& ids) const
{
    auto const& chars = byte_chars();
    std::string bytes;
    std::vector<char32_t> cps;
    std::vector<size_t> offsets;
    for (int64_t id : ids)
    {
        if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || id_to_token_[id].empty())
        {
            continue;
        }
        std::string const& token = id_to_token_[id];
        // tokenizers' ByteLevel decoder: a token made of byte characters gives those bytes; any other token
        // (the whitespace runs: ' ' is not a byte character) gives its own UTF-8.
        unicode::decode(token, cps, offsets);
        std::string own;
        bool all_bytes = true;
        for (char32_t c : cps)
        {
            if (c >= chars.byte_of.size() || chars.byte_of[c] < 0)
            {
                all_bytes = false;
                break;
            }
            own.push_back(static_cast<char>(chars.byte_of[c]));
        }
        bytes += all_bytes ? own : token;
    }
    return unicode::to_valid_utf8(bytes);
}

} // namespace codegen
