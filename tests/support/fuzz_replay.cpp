// tests/support/fuzz_replay.cpp — a main() for the libFuzzer targets of fuzz/ without libFuzzer.
//
// The sanitizer build of the suite (GCC, ASan + UBSan; tests/CMakeLists.txt) links every
// fuzz/<target>.cpp with this file into fuzz_replay_<target> and runs it as a test over
// fuzz/regressions/<target>/ and fuzz/corpus/<target>/: every input once, as it is, then
// `--variants N` mutations of each (default 0). A mutation is a few byte edits (overwrite, insert,
// erase, truncate) drawn from a generator seeded by the input's position in the sorted argument
// list and the variant's number, so a run is the same on every machine and a failing variant is
// found again by running the same command; the driver names each input before running it.
//
// CI gets the regression and corpus replay (and a few hundred mutations per target) under the
// suite's sanitizers without a second, clang-built copy of every kernel; scripts/fuzz.sh builds the
// real libFuzzer targets (coverage-guided, clang) for the smoke and the long campaigns.
//
//   fuzz_replay_attention_fuzz [--variants N] (file | directory)...
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

std::vector<std::uint8_t> read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "fuzz_replay: cannot read %s\n", p.c_str());
    std::exit(2);
  }
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// One to four byte edits of `in`; the generator is seeded by (input, variant).
std::vector<std::uint8_t> mutate(std::vector<std::uint8_t> in, std::uint32_t input, std::uint32_t variant) {
  std::mt19937 rng(input * 7919u + variant * 104729u + 1u);
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    const auto at = [&] { return in.empty() ? std::size_t{0} : static_cast<std::size_t>(rng() % in.size()); };
    switch (rng() % 5) {
      case 0:  // overwrite a byte
        if (!in.empty()) in[at()] = static_cast<std::uint8_t>(rng());
        break;
      case 1:  // flip one bit
        if (!in.empty()) in[at()] ^= static_cast<std::uint8_t>(1u << (rng() % 8));
        break;
      case 2:  // insert a byte
        in.insert(in.begin() + static_cast<std::ptrdiff_t>(in.empty() ? 0 : at()), static_cast<std::uint8_t>(rng()));
        break;
      case 3:  // erase a byte
        if (!in.empty()) in.erase(in.begin() + static_cast<std::ptrdiff_t>(at()));
        break;
      default:  // truncate
        if (!in.empty()) in.resize(at());
        break;
    }
  }
  return in;
}

}  // namespace

int main(int argc, char** argv) {
  long variants = 0;
  std::vector<std::filesystem::path> inputs;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--variants" && i + 1 < argc) {
      variants = std::strtol(argv[++i], nullptr, 10);
    } else if (std::filesystem::is_directory(a)) {
      std::vector<std::filesystem::path> files;
      for (const auto& e : std::filesystem::directory_iterator(a))
        if (e.is_regular_file()) files.push_back(e.path());
      std::sort(files.begin(), files.end());
      inputs.insert(inputs.end(), files.begin(), files.end());
    } else if (std::filesystem::is_regular_file(a)) {
      inputs.emplace_back(a);
    } else {
      std::fprintf(stderr, "fuzz_replay: %s is neither a file nor a directory\n", a.c_str());
      return 2;
    }
  }
  if (inputs.empty()) {
    std::fprintf(stderr, "fuzz_replay: no inputs\n");
    return 2;
  }
  long runs = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const auto bytes = read_file(inputs[i]);
    for (long v = 0; v <= variants; ++v) {
      const auto data = v == 0 ? bytes : mutate(bytes, static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(v));
      std::printf("fuzz_replay: %s variant %ld (%zu bytes)\n", inputs[i].c_str(), v, data.size());
      std::fflush(stdout);
      LLVMFuzzerTestOneInput(data.data(), data.size());
      ++runs;
    }
  }
  std::printf("fuzz_replay: %ld runs of %zu inputs, no failure\n", runs, inputs.size());
  return 0;
}
