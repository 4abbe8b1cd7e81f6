// mnemo/core/error.hpp — the one exception type every public entry point throws on bad input.
//
// A message always names the argument, what was expected and what was given, e.g.
//   "attention::reference: k.shape[1] (Hkv) must divide q.shape[1] (Hq): Hq=6, Hkv=4"
// Entry points validate once at the boundary; inner kernels take validated views.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mnemo {

class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}

// Throws mnemo::error with the pieces streamed together.
template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw error(concat(std::forward<Parts>(parts)...));
}

// Throws unless `ok`; the message is only built on failure.
template <class... Parts>
void require(bool ok, Parts&&... parts) {
  if (!ok) fail(std::forward<Parts>(parts)...);
}

}  // namespace detail
}  // namespace mnemo
