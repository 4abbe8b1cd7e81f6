// tests/simd/guarded.hpp — buffers whose neighbouring memory is unmapped, for tail tests.
//
// guarded_buffer<T>(n) places n elements so that the last one ends exactly where a PROT_NONE page
// begins, with another PROT_NONE page before the data's page(s). Any read or write past the end
// (or before the start) faults immediately, whatever the sanitizer settings; this is how the tests
// show that vector tails never touch memory they do not own.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace mnemo::test {

template <class T>
class guarded_buffer {
 public:
  explicit guarded_buffer(std::int64_t n) : n_(n) {
    page_ = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    data_pages_ = (bytes + page_ - 1) / page_ + 1;
    total_ = (data_pages_ + 2) * page_;  // guard, data pages, guard
    void* m = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("guarded_buffer: mmap failed");
    base_ = static_cast<unsigned char*>(m);
    if (mprotect(base_, page_, PROT_NONE) != 0 ||
        mprotect(base_ + (data_pages_ + 1) * page_, page_, PROT_NONE) != 0) {
      munmap(base_, total_);
      throw std::runtime_error("guarded_buffer: mprotect failed");
    }
    data_ = reinterpret_cast<T*>(base_ + (data_pages_ + 1) * page_ - bytes);
  }
  guarded_buffer(const guarded_buffer&) = delete;
  guarded_buffer& operator=(const guarded_buffer&) = delete;
  ~guarded_buffer() { munmap(base_, total_); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::int64_t size() const { return n_; }
  T& operator[](std::int64_t i) { return data_[i]; }

 private:
  std::int64_t n_;
  std::size_t page_ = 0, data_pages_ = 0, total_ = 0;
  unsigned char* base_ = nullptr;
  T* data_ = nullptr;
};

}  // namespace mnemo::test
