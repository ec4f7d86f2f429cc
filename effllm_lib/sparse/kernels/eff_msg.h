// Error messages of the torch-side code without iostreams: on the device machine's build, formatting an
// integer with std::ostream inside the extension (c10::str, which TORCH_CHECK also uses) segfaulted, so
// messages are std::string + std::to_string, and entry points return them (see bindings.cpp).
#pragma once
#include <torch/extension.h>

#include <string>
#include <type_traits>

// A message from strings, integers and dtype names, without iostreams (see above).
inline void eff_append(std::string& s, const char* v) { s += v; }
inline void eff_append(std::string& s, const std::string& v) { s += v; }
inline void eff_append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
template <typename T, typename std::enable_if<std::is_integral<T>::value, int>::type = 0>
inline void eff_append(std::string& s, T v) { s += std::to_string(v); }
template <typename... Args>
std::string eff_msg(const Args&... args) {
  std::string s;
  (eff_append(s, args), ...);
  return s;
}

// Return the message from the enclosing function (std::string) when cond is false.
#define EFF_CHECK(cond, ...)                   \
  do {                                         \
    if (!(cond)) return eff_msg(__VA_ARGS__);  \
  } while (0)
// Propagate a non-empty message from a helper check.
#define EFF_TRY(expr)                  \
  do {                                 \
    std::string eff_err_ = (expr);     \
    if (!eff_err_.empty()) return eff_err_; \
  } while (0)
