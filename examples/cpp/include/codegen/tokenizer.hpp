#pragma once
// CodeGen's tokenizer: GPT-2's byte-level BPE plus CodeGen's added tokens (runs of 2..31 spaces and 2..9
// tabs, <|endoftext|>), computing the ids and text the `tokenizers` library computes for the same files
// (tests/cpp checks it on HumanEval, edge cases and random bytes).
//
// encode: the added tokens are cut out first (leftmost-longest, special tokens before the others, as
// tokenizers does), the rest is split by GPT-2's regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (written out by hand below: the classes come from Unicode tables), each piece's UTF-8 bytes become
// GPT-2's byte characters and BPE merges them, lowest merge rank first.
// decode: the tokens' byte characters back to bytes, then invalid UTF-8 replaced by U+FFFD.

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace codegen
{

class Tokenizer
{
public:
    // From tokenizer.json, else vocab.json + merges.txt (+ added_tokens.json) in `folder`; codegen::Error with
    // one line when the files are missing, unreadable, or use a tokenizers feature this code does not have.
    static Tokenizer load(std::filesystem::path const& folder);

    // Any bytes: invalid UTF-8 is read as U+FFFD, as Python's bytes.decode("utf-8", "replace") reads it.
    std::vector<int64_t> encode(std::string_view text) const;
    // Valid UTF-8; ids the tokenizer does not have are skipped (as tokenizers does).
    std::string decode(std::vector<int64_t> const& ids) const;
    // The pieces BPE sees (added tokens as pieces of their own), in the input's UTF-8: for tests.
    std::vector<std::string> pretokenize(std::string_view text) const;

    int64_t eos_token_id() const { return eos_; }

private:
    struct AddedToken
    {
        std::string content;
        int32_t id;
        bool normalized;  // matched after normalization (there is none here), in a second pass
    };
    struct MergeResult
    {
        uint32_t rank;
        int32_t id;
    };
    // A part of the input: an added token's id, or -1 for text that BPE encodes.
    struct Segment
    {
        std::string_view text;
        int32_t added_id;
    };

    Tokenizer() = default;
    void add_merge(std::string const& left, std::string const& right, uint32_t rank, std::string const& where);
    void add_token(AddedToken token);
    void finish(std::string const& where);
    std::vector<Segment> split_added(std::string_view text) const;
    void bpe(std::string_view piece, std::vector<int64_t>& out) const;

    std::unordered_map<std::string, int32_t> vocab_;
    std::vector<std::string> id_to_token_;  // "" where an id has no token
    std::unordered_map<uint64_t, MergeResult> merges_;  // (left id << 32 | right id) -> rank, merged id
    std::vector<AddedToken> added_;
    int32_t byte_id_[256] = {};  // the vocab id of each byte's character, -1 if absent
    bool ignore_merges_ = false;
    int64_t eos_ = -1;
};

} // namespace codegen
