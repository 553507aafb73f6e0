#include "unicode.hpp"

#include <algorithm>
#include <iterator>

namespace codegen::unicode
{
namespace
{

struct CodeRange
{
    char32_t first, last;
};

#include "unicode_tables.inc"

template <size_t N>
bool in(CodeRange const (&table)[N], char32_t cp)
{
    // The first range whose last code point is >= cp; cp is in it if it does not start after cp.
    auto it = std::lower_bound(std::begin(table), std::end(table), cp,
        [](CodeRange const& r, char32_t c) { return r.last < c; });
    return it != std::end(table) && it->first <= cp;
}

bool continuation(unsigned char b)
{
    return b >= 0x80 && b <= 0xBF;
}

} // namespace

std::string to_valid_utf8(std::string_view bytes)
{
    std::string out;
    out.reserve(bytes.size());
    size_t const n = bytes.size();
    size_t i = 0;
    while (i < n)
    {
        auto const b = static_cast<unsigned char>(bytes[i]);
        if (b < 0x80)
        {
            out.push_back(static_cast<char>(b));
            ++i;
            continue;
        }
        // Well-formed sequences (Unicode Table 3-7): the lead byte fixes the length and the second byte's range.
        size_t len = 0;
        unsigned char lo = 0x80, hi = 0xBF;
        if (b >= 0xC2 && b <= 0xDF) len = 2;
        else if (b == 0xE0) len = 3, lo = 0xA0;
        else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) len = 3;
        else if (b == 0xED) len = 3, hi = 0x9F;  // no surrogates
        else if (b == 0xF0) len = 4, lo = 0x90;
        else if (b >= 0xF1 && b <= 0xF3) len = 4;
        else if (b == 0xF4) len = 4, hi = 0x8F;  // nothing above U+10FFFF
        if (len == 0)
        {
            append_utf8(out, kReplacement);  // a byte that never starts a sequence
            ++i;
            continue;
        }
        size_t good = 1;  // bytes of the sequence that are valid so far
        while (good < len && i + good < n)
        {
            auto const c = static_cast<unsigned char>(bytes[i + good]);
            bool const ok = good == 1 ? (c >= lo && c <= hi) : continuation(c);
            if (!ok)
            {
                break;
            }
            ++good;
        }
        if (good == len)
        {
            out.append(bytes.substr(i, len));
        }
        else
        {
            append_utf8(out, kReplacement);  // one replacement for the maximal subpart
        }
        i += good;
    }
    return out;
}

void decode(std::string_view valid, std::vector<char32_t>& code_points, std::vector<size_t>& offsets)
{
    code_points.clear();
    offsets.clear();
    size_t i = 0;
    while (i < valid.size())
    {
        auto const b = static_cast<unsigned char>(valid[i]);
        size_t const len = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
        char32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
        for (size_t k = 1; k < len; ++k)
        {
            cp = (cp << 6) | (static_cast<unsigned char>(valid[i + k]) & 0x3F);
        }
        code_points.push_back(cp);
        offsets.push_back(i);
        i += len;
    }
    offsets.push_back(valid.size());
}

void append_utf8(std::string& out, char32_t cp)
{
    if (cp < 0x80)
    {
        out.push_back(static_cast<char>(cp));
    }
    else if (cp < 0x800)
    {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    else if (cp < 0x10000)
    {
        out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    else
    {
        out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
}

bool is_letter(char32_t cp)
{
    if (cp < 0x80)
    {
        return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
    }
    return in(kLetters, cp);
}

bool is_number(char32_t cp)
{
    if (cp < 0x80)
    {
        return cp >= '0' && cp <= '9';
    }
    return in(kNumbers, cp);
}

bool is_space(char32_t cp)
{
    // Oniguruma's list for \s in Unicode mode (doc/RE): the White_Space property. U+180E is not in it.
    switch (cp)
    {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D: case 0x20: case 0x85: case 0xA0: case 0x1680:
    case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
        return true;
    default:
        return cp >= 0x2000 && cp <= 0x200A;
    }
}

} // namespace codegen::unicode
