// bench/peak_memory.cpp — peak resident memory of a row, through Google Benchmark's MemoryManager.
//
// With MNEMO_BENCH_MEMORY=1, Google Benchmark runs every row once more (min(16, iterations)
// iterations, including the row's own setup: its inputs, outputs and workspaces) between
// Start() and Stop(), and writes "max_bytes_used" into the JSON. Here that is the growth of the
// process's peak resident set over the run, read from Linux's VmHWM after resetting it
// (`5` to /proc/self/clear_refs, Linux >= 4.0):
//
//   max_bytes_used = VmHWM after the row - VmRSS before it
//
// so it counts the pages the row touched that were not resident before: inputs, outputs and
// every buffer a kernel or baseline allocates and writes (the Eigen baseline's [Lq, Lk] scores,
// the GEMM baselines' [256, Lk] blocks, a framework's temporaries). To keep earlier rows' freed
// memory from being reused unseen, glibc is told to serve every allocation above 64 KiB by mmap
// (so it is returned on free) and to return its free heap first (malloc_trim). Resolution: pages
// (4 KiB); buffers below 64 KiB that come from the reused heap may go uncounted. Where
// clear_refs cannot be written (some sandboxes) no figure is reported (max_bytes_used = 0 and a
// note on stderr). scripts/bench.sh runs this as a separate pass (one iteration per row).
#include <malloc.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <string_view>

#include "common.hpp"

namespace mnemo::bench {
namespace {

// A field of /proc/self/status in bytes ("VmRSS:    1234 kB"), -1 if absent.
std::int64_t status_bytes(std::string_view field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  constexpr std::int64_t kib = 1024;
  while (std::getline(in, line))
    if (line.rfind(field, 0) == 0 && line.size() > field.size() && line[field.size()] == ':')
      return std::strtoll(line.c_str() + field.size() + 1, nullptr, 10) * kib;
  return -1;
}

bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

class peak_rss_manager final : public benchmark::MemoryManager {
 public:
  void Start() override {
    malloc_trim(0);
    ok_ = reset_peak_rss();
    before_ = status_bytes("VmRSS");
    if (!ok_ && !warned_) {
      std::fprintf(stderr, "mnemo_bench: cannot reset the peak RSS (/proc/self/clear_refs): no memory figures\n");
      warned_ = true;
    }
  }
  void Stop(Result& result) override {
    const std::int64_t peak = status_bytes("VmHWM");
    result.max_bytes_used = ok_ && peak >= 0 && before_ >= 0 && peak > before_ ? peak - before_ : 0;
  }
  void Stop(Result* result) override { Stop(*result); }

 private:
  bool ok_ = false, warned_ = false;
  std::int64_t before_ = 0;
};

// Allocations above this go to mmap and back to the system on free (glibc's default threshold
// grows with the largest block freed, up to 32 MiB, after which freed blocks stay resident).
constexpr int mmap_threshold_bytes = 64 * 1024;

const bool registered = [] {
  const char* env = std::getenv("MNEMO_BENCH_MEMORY");
  if (env == nullptr || std::string_view(env) != "1") return false;
  mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes);
  static peak_rss_manager manager;
  benchmark::RegisterMemoryManager(&manager);
  benchmark::AddCustomContext("mnemo_memory", "max_bytes_used = peak RSS growth over one run of the row");
  return true;
}();

}  // namespace
}  // namespace mnemo::bench
