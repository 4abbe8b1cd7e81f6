// mnemo_flash_memory L D [causal] — one flash forward over a single head, for measuring peak memory.
//
// FlashAttention keeps no Lq x Lk buffer: its workspace is a few tiles per thread. Run it under
// `/usr/bin/time -v` and compare "Maximum resident set size" with the inputs + outputs printed
// here (bench/README.md, "Memory"). The inputs are touched before the call, so they are resident.
#include <mnemo/attention/flash.hpp>

#include <cstdio>
#include <cstdlib>
#include <random>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s L D [causal]\n", argv[0]);
    return 2;
  }
  const std::int64_t L = std::atoll(argv[1]), D = std::atoll(argv[2]);
  const bool causal = argc > 3 && std::atoi(argv[3]) != 0;
  mnemo::tensor<float, 4> q({1, 1, L, D}), k({1, 1, L, D}), v({1, 1, L, D}), out({1, 1, L, D});
  mnemo::tensor<float, 3> lse({1, 1, L});
  std::mt19937 rng(1);
  std::normal_distribution<float> n;
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = n(rng);
  if (causal) mnemo::attention::flash(q, k, v, out, lse, mnemo::attention::mods::causal{});
  else mnemo::attention::flash(q, k, v, out, lse);
  const double mib = 1024.0 * 1024.0;
  const double io = double(q.bytes() + k.bytes() + v.bytes() + out.bytes() + lse.bytes()) / mib;
  double checksum = 0;
  for (float x : out) checksum += x;
  std::printf("L=%lld D=%lld causal=%d inputs+outputs=%.1f MiB checksum=%.6g\n", static_cast<long long>(L),
              static_cast<long long>(D), causal ? 1 : 0, io, checksum);
  return 0;
}
