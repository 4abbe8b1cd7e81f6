// fuzz/npy_fuzz.cpp — npy::load on arbitrary bytes: it either returns an array whose byte count
// matches its shape and dtype, or throws mnemo::error; never crashes, never allocates more than
// the file holds. A loaded array converts to a tensor of exactly the element types that read its
// dtype (npy::reads<T>) and of its own rank (other ranks and element types throw), and save + load
// gives the same shape and bytes back (the converted tensor's bytes, in the element type's dtype).
// A shape whose tensor of a wider element type would need 2^63 bytes loads (its element count may
// be 0) and is rejected by that conversion only.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "common.hpp"
#include "mnemo/core/npy.hpp"

namespace {

using namespace mnemo;

// Per-process scratch files (libFuzzer may run several jobs at once).
const std::string& scratch(int i) {
  static const std::string paths[2] = {"/tmp/mnemo_npy_fuzz_" + std::to_string(::getpid()) + "_in.npy",
                                       "/tmp/mnemo_npy_fuzz_" + std::to_string(::getpid()) + "_out.npy"};
  return paths[i];
}

template <class T, int R>
void roundtrip(const npy::array& a) {
  tensor<T, R> t = a.as<T, R>();
  fuzz::check(t.size() == a.size(), "tensor size differs from the loaded element count");
  npy::save(scratch(1), t);
  const npy::array b = npy::load(scratch(1));
  fuzz::check(b.type == npy::dtype_of<T>() && b.shape == a.shape, "save + load changed the dtype or shape");
  fuzz::check(b.bytes.size() == t.bytes() && (t.size() == 0 || std::memcmp(b.bytes.data(), t.data(), t.bytes()) == 0),
              "save + load changed the data");
  if (a.type == npy::dtype_of<T>()) fuzz::check(b.bytes == a.bytes, "save + load of the file's own dtype changed its bytes");
}

// Does a tensor<T> of the array's shape fit in 2^63 bytes? Tensors multiply the non-zero extents
// (sizes, strides) in int64 even when another extent is 0; load() checks that for the file's own
// item size, so an array of 1-byte items may load and still not convert to a wider type.
template <class T>
bool fits_as(const npy::array& a) {
  std::int64_t n = static_cast<std::int64_t>(sizeof(T));
  for (auto e : a.shape)
    if (e != 0 && __builtin_mul_overflow(n, e, &n)) return false;
  return true;
}

template <class T>
void as_every_rank(const npy::array& a) {
  const int rank = static_cast<int>(a.shape.size());
  for (int r = 1; r <= 4; ++r) {
    try {
      if (r == 1) roundtrip<T, 1>(a);
      else if (r == 2) roundtrip<T, 2>(a);
      else if (r == 3) roundtrip<T, 3>(a);
      else roundtrip<T, 4>(a);
      fuzz::check(r == rank && npy::reads<T>(a.type) && fits_as<T>(a), "as<T, R> accepted another dtype or rank");
    } catch (const mnemo::error&) {
      fuzz::check(r != rank || !npy::reads<T>(a.type) || !fits_as<T>(a),
                  "as<T, R> rejected a dtype it reads, of its rank, whose tensor fits");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  {
    std::FILE* f = std::fopen(scratch(0).c_str(), "wb");
    if (!f) fuzz::die("cannot write %s", scratch(0).c_str());
    if (size) std::fwrite(data, 1, size, f);
    std::fclose(f);
  }
  npy::array a;
  try {
    a = npy::load(scratch(0));
  } catch (const mnemo::error&) {
    fuzz::stats::count("rejected (mnemo::error)");
    return 0;
  }
  fuzz::stats::count("loaded");
  fuzz::check(a.size() >= 0, "negative element count");
  fuzz::check(a.bytes.size() == static_cast<std::size_t>(a.size()) * npy::item_size(a.type),
              "loaded byte count differs from shape x item size");
  fuzz::check(a.bytes.size() <= size, "loaded more bytes than the file holds");
  as_every_rank<float>(a);
  as_every_rank<f16>(a);
  as_every_rank<std::int64_t>(a);
  as_every_rank<double>(a);
  as_every_rank<std::int32_t>(a);
  as_every_rank<std::uint8_t>(a);
  return 0;
}
