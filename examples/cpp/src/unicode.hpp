#pragma once
// UTF-8 and the Unicode classes of GPT-2's pre-tokenizer regex, as the `tokenizers` library sees them.

#include <string>
#include <string_view>
#include <vector>

namespace codegen::unicode
{

constexpr char32_t kReplacement = 0xFFFD;

// Any bytes -> valid UTF-8: each maximal ill-formed subpart becomes one U+FFFD (the Unicode standard's
// recommended practice, which Python's errors="replace" and Rust's String::from_utf8_lossy both follow).
std::string to_valid_utf8(std::string_view bytes);

// Valid UTF-8 -> code points, with the byte offset of each (and a last entry: the text's length).
void decode(std::string_view valid, std::vector<char32_t>& code_points, std::vector<size_t>& offsets);

void append_utf8(std::string& out, char32_t cp);

bool is_letter(char32_t cp);  // \p{L}
bool is_number(char32_t cp);  // \p{N}
bool is_space(char32_t cp);   // Oniguruma's \s with Unicode (the White_Space property)

} // namespace codegen::unicode
