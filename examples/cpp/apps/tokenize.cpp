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

#include <iostream>
#include <sstream>
#include <string>

namespace
{

std::string from_hex(std::string const& hex)
{
    if (hex.size() % 2 != 0)
    {
        throw codegen::Error("an input line has an odd number of hex digits");
    }
    std::string out;
    for (size_t i = 0; i < hex.size(); i += 2)
    {
        out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    }
    return out;
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
        std::string line;
        while (std::getline(std::cin, line))
        {
            if (mode == "decode")
            {
                std::vector<int64_t> ids;
                std::istringstream in(line);
                for (int64_t id; in >> id;)
                {
                    ids.push_back(id);
                }
                std::cout << to_hex(tok.decode(ids)) << "\n";
                continue;
            }
            std::string const text = from_hex(line);
            if (mode == "encode")
            {
                auto const ids = tok.encode(text);
                for (size_t i = 0; i < ids.size(); ++i)
                {
                    std::cout << (i ? " " : "") << ids[i];
                }
            }
            else
            {
                auto const pieces = tok.pretokenize(text);
                for (size_t i = 0; i < pieces.size(); ++i)
                {
                    std::cout << (i ? " " : "") << to_hex(pieces[i]);
                }
            }
            std::cout << "\n";
        }
        return 0;
    }
    catch (codegen::Error const& e)
    {
        std::cerr << "error: " << e.what() << "\n";
        return 2;
    }
}
