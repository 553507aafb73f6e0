#pragma once
// The one error type for expected failures (a missing or foreign export, a damaged tokenizer, a bad option):
// its message is one line saying what is wrong and what to do, as the Python commands print it.

#include <stdexcept>
#include <string>

namespace codegen
{

class Error : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

} // namespace codegen
