// codegen_tokenize: the C++ tokenizer over many inputs at once, for tests and for checking a tokenizer folder.
//
//   codegen_tokenize DIR encode|pretokenize   each stdin line: the input's bytes in hex (any bytes, also
//                                             invalid UTF-8); out: ids separated by spaces, or the pieces'
//                                             UTF-8 in hex separated by spaces
//   codegen_tokenize DIR decode               each stdin line: ids separated by spaces; out: the text in hex
//
// Hex keeps every input (newlines, NUL, invalid UTF-8) on one line of its own.

#include "codegen/error.hpp"
#include "codegen/tokenizer.hpp"

#include <charconv>
#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace
{

int hex_digit(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// A line of hex digits as bytes; one line (exit 2) for anything else, not std::stoi's exception (an abort).
std::string from_hex(std::string const& hex, size_t line)
{
    std::string const where = "input line " + std::to_string(line);
    if (hex.size() % 2 != 0)
    {
        throw codegen::Error(where + " has an odd number of hex digits: give each input's bytes as hex");
    }
    std::string out;
    for (size_t i = 0; i < hex.size(); i += 2)
    {
        int const high = hex_digit(hex[i]), low = hex_digit(hex[i + 1]);
        if (high < 0 || low < 0)
        {
            throw codegen::Error(where + " is not hex (a character other than 0-9, a-f at column "
                + std::to_string(i + (high < 0 ? 1 : 2)) + "): give each input's bytes as hex");
        }
        out.push_back(static_cast<char>(high * 16 + low));
    }
    return out;
}

// A line of token ids separated by spaces; one line (exit 2) for anything else, not the ids before it.
std::vector<int64_t> parse_ids(std::string const& text, size_t line)
{
    std::vector<int64_t> ids;
    std::istringstream in(text);
    for (std::string word; in >> word;)
    {
        int64_t id = 0;
        auto const [end, error] = std::from_chars(word.data(), word.data() + word.size(), id);
        if (error != std::errc() || end != word.data() + word.size())
        {
            throw codegen::Error("input line " + std::to_string(line) + " has '" + word
                + "', not a token id: give ids separated by spaces");
        }
        ids.push_back(id);
    }
    return ids;
}

std::string to_hex(std::string const& bytes)
{
    static char const digits[] = "0123456789abcdef";
    std::string out;
    for (unsigned char b : bytes)
    {
        out.push_back(digits[b >> 4]);
        out.push_back(digits[b & 15]);
    }
    return out;
}

} // namespace

int main(int argc, char** argv)
{
    std::ios::sync_with_stdio(false);
    try
    {
        std::string const mode = argc == 3 ? argv[2] : "";
        if (mode != "encode" && mode != "decode" && mode != "pretokenize")
        {
            throw codegen::Error("usage: codegen_tokenize TOKENIZER_DIR encode|decode|pretokenize < lines");
        }
        codegen::Tokenizer const tok = codegen::Tokenizer::load(argv[1]);
        // All output is written at the end: a bad line later on leaves no half of the answer behind.
        std::ostringstream out;
        std::string line;
        for (size_t number = 1; std::getline(std::cin, line); ++number)
        {
            if (mode == "decode")
            {
                out << to_hex(tok.decode(parse_ids(line, number))) << "\n";
                continue;
            }
            std::string const text = from_hex(line, number);
            if (mode == "encode")
            {
                auto const ids = tok.encode(text);
                for (size_t i = 0; i < ids.size(); ++i)
                {
                    out << (i ? " " : "") << ids[i];
                }
            }
            else
            {
                auto const pieces = tok.pretokenize(text);
                for (size_t i = 0; i < pieces.size(); ++i)
                {
                    out << (i ? " " : "") << to_hex(pieces[i]);
                }
            }
            out << "\n";
        }
        std::cout << out.str();
        return 0;
    }
    catch (codegen::Error const& e)
    {
        std::cerr << "error: " << e.what() << "\n";
        return 2;
    }
    catch (std::exception const& e)
    {
        std::cerr << "error: " << e.what() << "\n";  // not the input's doing (memory running out)
        return 1;
    }
}
