// A consumer: include one header, run attention on a few tensors, check the answer. The
// find_package consumer includes the umbrella header (every installed header must resolve and
// compile); the add_subdirectory one the reference kernel's own header (including everything costs
// 45 s of CI's compile, and the install tree is what the umbrella check is about).
#if MNEMO_CONSUMER_UMBRELLA
#include <mnemo/mnemo.hpp>
#else
#include <mnemo/attention/reference.hpp>
#endif

#include <cmath>
#include <cstdio>

int main() {
  // One query against three keys whose scores are 0, log 2 and log 4 (scale 1), so the
  // softmax weights are 1/7, 2/7, 4/7 and the output is their weighted values.
  mnemo::tensor<float, 4> q({1, 1, 1, 1}), k({1, 1, 3, 1}), v({1, 1, 3, 2}), out({1, 1, 1, 2});
  mnemo::tensor<float, 3> lse({1, 1, 1});
  q(0, 0, 0, 0) = 1.0f;
  const float scores[3] = {0.0f, std::log(2.0f), std::log(4.0f)};
  for (int j = 0; j < 3; ++j) {
    k(0, 0, j, 0) = scores[j];
    v(0, 0, j, 0) = static_cast<float>(j);
    v(0, 0, j, 1) = 1.0f;
  }
  mnemo::attention::options opt;
  opt.scale = 1.0f;
  mnemo::attention::reference(q, k, v, out, lse, mnemo::attention::mods::none{}, opt);

  const float want0 = (0 * 1 + 1 * 2 + 2 * 4) / 7.0f, want_lse = std::log(7.0f);
  const bool ok = std::fabs(out(0, 0, 0, 0) - want0) < 1e-6f && std::fabs(out(0, 0, 0, 1) - 1.0f) < 1e-6f &&
                  std::fabs(lse(0, 0, 0) - want_lse) < 1e-6f;
  std::printf("out = [%g, %g], lse = %g (want [%g, 1], %g): %s\n", out(0, 0, 0, 0), out(0, 0, 0, 1), lse(0, 0, 0),
              want0, want_lse, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
