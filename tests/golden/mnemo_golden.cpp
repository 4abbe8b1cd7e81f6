// mnemo_golden [DIR] — runs every golden case folder under DIR against every registered
// implementation of its op, and compares the outputs by the rule of DIR/README.md.
//
// DIR defaults to the environment variable MNEMO_GOLDEN_DIR, else to the folder compiled in
// as the MNEMO_GOLDEN_DIR macro (else <source>/../shared/golden, as tests/CMakeLists.txt has it). Output, one line per (case, implementation), cases in sorted
// order:
//
//   PASS attn_fwd_plain [reference] max_err=1.19e-07 (0.006 of tol)
//   FAIL attn_fwd_plain [flash] out[0, 1, 5, 3]: got 0.123, want 0.125 (|diff| ... > tol ...); 3 of 8192 elements wrong
//   SKIP linear_attn (op 'linear_attn' not implemented)
//   FAIL broken_case (malformed case: meta.json: 'op' must be a string)
//   ...
//   20 passed, 1 failed, 38 skipped
//
// A case whose op has no implementation is skipped, never passed. The exit status is non-zero
// if anything failed or if DIR holds no case at all.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "golden/runner.hpp"

namespace {

namespace fs = std::filesystem;
namespace golden = mnemo::golden;

struct tally {
  int passed = 0, failed = 0, skipped = 0;
};

// One line of output: messages may carry newlines (an .npy header does), which would break the
// one-line-per-result format.
std::string one_line(std::string s) {
  for (auto& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

void print(const char* status, const std::string& text) { std::printf("%s %s\n", status, one_line(text).c_str()); }

// Runs one implementation on one case and returns "" on success or the failure text; sets
// max_err / max_ratio to the worst over all outputs.
std::string run_one(const golden::golden_case& c, const golden::implementation& impl,
                    const std::vector<mnemo::npy::array>& want, double& max_err, double& max_ratio) {
  golden::results got;
  try {
    got = impl.fn(c);
  } catch (const std::exception& e) {
    return std::string("error: ") + e.what();
  } catch (...) {
    return "error: unknown exception";
  }
  std::string failures;
  for (std::size_t o = 0; o < c.outputs().size(); ++o) {
    const std::string& name = c.outputs()[o];
    const mnemo::npy::array* g = got.find(name);
    if (!g) {
      failures += (failures.empty() ? "" : " | ") + name + ": not produced";
      continue;
    }
    const golden::comparison cmp = golden::compare(name, *g, want[o], c.atol(), c.rtol());
    max_err = std::max(max_err, cmp.max_err);
    max_ratio = std::max(max_ratio, cmp.max_ratio);
    if (!cmp.ok) failures += (failures.empty() ? "" : " | ") + cmp.failure;
  }
  for (const auto& name : got.names())
    if (std::find(c.outputs().begin(), c.outputs().end(), name) == c.outputs().end())
      failures += (failures.empty() ? "" : " | ") + name + ": produced, but meta.json does not list it";
  return failures;
}

void run_case(const fs::path& dir, tally& t) {
  const std::string name = dir.filename().string();
  std::optional<golden::golden_case> c;
  std::vector<const golden::implementation*> impls;
  std::vector<mnemo::npy::array> want;  // the golden outputs, in meta.json's order
  try {
    c.emplace(dir);
    impls = golden::implementations_of(c->op());
    if (impls.empty()) {
      print("SKIP", name + " (op '" + c->op() + "' not implemented)");
      ++t.skipped;
      return;
    }
    for (const auto& o : c->outputs()) want.push_back(c->expected(o));
  } catch (const std::exception& e) {
    print("FAIL", name + " (malformed case: " + e.what() + ")");
    ++t.failed;
    return;
  }
  for (const auto* impl : impls) {
    double max_err = 0, max_ratio = 0;
    const std::string failure = run_one(*c, *impl, want, max_err, max_ratio);
    const std::string head = name + " [" + impl->label + "] ";
    if (failure.empty()) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "max_err=%.3g (%.2g of tol)", max_err, max_ratio);
      print("PASS", head + buf);
      ++t.passed;
    } else {
      print("FAIL", head + failure);
      ++t.failed;
    }
  }
}

fs::path default_dir() {
  if (const char* env = std::getenv("MNEMO_GOLDEN_DIR"); env && *env) return env;
#if defined(MNEMO_GOLDEN_DIR)
  return MNEMO_GOLDEN_DIR;
#else
  // Without the macro, tests/CMakeLists.txt's own default: <source>/../shared/golden.
  return (fs::path(__FILE__).parent_path() / ".." / ".." / ".." / "shared" / "golden").lexically_normal();
#endif
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 2 || (argc == 2 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help"))) {
    std::fprintf(stderr, "usage: %s [DIR]   (default: $MNEMO_GOLDEN_DIR, else the compiled-in folder)\n", argv[0]);
    return 2;
  }
  const fs::path dir = argc == 2 ? fs::path(argv[1]) : default_dir();
  std::error_code ec;
  if (dir.empty() || !fs::is_directory(dir, ec)) {
    std::fprintf(stderr, "mnemo_golden: no golden folder: '%s' (give DIR or set MNEMO_GOLDEN_DIR)\n",
                 dir.string().c_str());
    std::printf("0 passed, 0 failed, 0 skipped\n");
    return 1;
  }

  tally t;
  for (const auto& msg : golden::global_registry().errors) {
    print("FAIL", "(registry) " + msg);
    ++t.failed;
  }

  // Every sub-folder is a case, hidden ones excepted; sorted so the output is stable.
  std::vector<fs::path> cases;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_directory(ec) && e.path().filename().string().rfind('.', 0) != 0) cases.push_back(e.path());
  std::sort(cases.begin(), cases.end());
  for (const auto& c : cases) run_case(c, t);

  if (cases.empty()) std::fprintf(stderr, "mnemo_golden: no case folders in '%s'\n", dir.string().c_str());
  std::printf("%d passed, %d failed, %d skipped\n", t.passed, t.failed, t.skipped);
  std::fflush(stdout);
  return t.failed == 0 && !cases.empty() ? 0 : 1;
}
