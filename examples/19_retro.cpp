// 19 — RETRO: retrieve neighbours per chunk, then read them with chunked cross-attention.
//
// Borgeaud et al., "Improving language models by retrieving from trillions of tokens" (ICML 2022),
// memory/retro.hpp. The database is a "document" of 64 chunks of m = 8 tokens (token embeddings:
// random unit vectors in Dt = 16 dimensions). Each database entry is
//   key      the chunk's embedding: the mean of its tokens, normalised (a stand-in for frozen BERT)
//   payload  r = 2m tokens: the chunk N and its continuation F (the next chunk of the document)
// The input is L = 43 tokens copied, with a little noise, from database chunks 40 .. 45 (five full
// chunks and three tokens of a sixth). Then:
//   1. each input chunk retrieves its k = 2 nearest database chunks (exact kNN); for every full
//      chunk the nearest is the chunk it was copied from;
//   2. the IVF index (memory/knn_ivf.hpp) probing every list gives the same neighbours, and
//      probing a quarter of the lists finds most of them;
//   3. the neighbours (encoder: the identity here) are read by CCA with the input tokens as
//      queries. Token i reads the neighbours of chunk floor((i + 1) / m) - 1: from the last token
//      of a chunk on, the next chunk's tokens see [N; F] of the chunk before, and F is exactly the
//      clean text they are a noisy copy of. So with a sharp softmax every attending token reads
//      back its own clean embedding, and the first m - 1 tokens read nothing (0);
//   4. the fast path (attention::flash over strided chunk views) matches the double reference.
#include <mnemo/memory/knn_ivf.hpp>
#include <mnemo/memory/retro.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>

namespace mem = mnemo::memory;
using mnemo::tensor;
using mnemo::view;

namespace {

constexpr std::int64_t m = 8, Dt = 16, n_db = 64, r = 2 * m, k = 2, first = 40, L = 5 * m + 3;

void normalise(float* x, std::int64_t n) {
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += double(x[i]) * x[i];
  for (std::int64_t i = 0; i < n; ++i) x[i] = float(x[i] / std::sqrt(s));
}

}  // namespace

int main() {
  std::mt19937 rng(19);
  std::normal_distribution<float> normal;
  bool ok = true;

  // The document: n_db chunks of m unit tokens.
  tensor<float, 2> doc({n_db * m, Dt});
  for (std::int64_t t = 0; t < n_db * m; ++t) {
    for (std::int64_t e = 0; e < Dt; ++e) doc(t, e) = normal(rng);
    normalise(&doc(t, 0), Dt);
  }
  // Database entries: key = normalised chunk mean, payload = [chunk; next chunk] (zeros after the end).
  tensor<float, 2> keys({n_db, Dt});
  mem::retro_chunk_means(doc, m, keys);
  for (std::int64_t c = 0; c < n_db; ++c) normalise(&keys(c, 0), Dt);
  tensor<float, 3> payload({n_db, r, Dt});
  for (std::int64_t c = 0; c < n_db; ++c)
    for (std::int64_t t = 0; t < r && (c * m + t) < n_db * m; ++t)
      std::copy(&doc(c * m + t, 0), &doc(c * m + t, 0) + Dt, &payload(c, t, 0));
  mem::retro_database db(Dt, r, Dt, n_db);
  db.add(keys, payload);

  // The input: a noisy copy of the document from chunk `first` on.
  tensor<float, 2> x({L, Dt});
  for (std::int64_t t = 0; t < L; ++t)
    for (std::int64_t e = 0; e < Dt; ++e) x(t, e) = doc(first * m + t, e) + 0.05f * normal(rng);

  // 1. Retrieval: one query per input chunk (the partial last one too).
  const std::int64_t C = (L + m - 1) / m;
  tensor<float, 2> queries({C, Dt});
  mem::retro_chunk_means(x, m, queries);
  for (std::int64_t u = 0; u < C; ++u) normalise(&queries(u, 0), Dt);
  tensor<std::int64_t, 2> slots({C, k});
  db.retrieve(queries, slots);
  // The partial last chunk (3 of 8 tokens) has a poorer key, and no token reads its neighbours yet.
  const std::int64_t full = L / m;
  int found = 0;
  for (std::int64_t u = 0; u < full; ++u) found += db.keys().position(slots(u, 0)) == first + u ? 1 : 0;
  std::printf("1. exact kNN: %d of %ld full input chunks retrieve their source chunk first\n", found, long(full));
  ok &= found == full;

  // 2. The IVF index: all lists = exact; a quarter of them = approximate.
  mem::knn_index index;
  index.build(db.keys(), {.n_lists = 16, .seed = 1});
  tensor<std::int64_t, 2> all_lists({C, k}), quarter({C, k});
  db.retrieve(queries, index, 16, all_lists);
  db.retrieve(queries, index, 4, quarter);
  int same = 0, approx = 0;
  for (std::int64_t u = 0; u < C; ++u) {
    same += all_lists(u, 0) == slots(u, 0) && all_lists(u, 1) == slots(u, 1) ? 1 : 0;
    approx += quarter(u, 0) == slots(u, 0) ? 1 : 0;
  }
  std::printf("2. IVF, 16 of 16 lists probed: %d of %ld identical; 4 of 16 probed: %d of %ld top-1 found\n", same,
              long(C), approx, long(C));
  ok &= same == C;

  // 3. CCA: neighbours [C k r, Dt] as keys and values (identity encoder), queries = the input tokens.
  tensor<float, 2> nb({C * k * r, Dt});
  db.gather(slots, nb);
  const view<const float, 4> q(x.data(), {1, 1, L, Dt}), kv(nb.data(), {1, 1, C * k * r, Dt});
  tensor<float, 4> out({1, 1, L, Dt}), out_ref({1, 1, L, Dt});
  tensor<float, 3> lse({1, 1, L});
  const mem::retro_options opt{.chunk_len = m, .neighbour_len = k * r, .scale = 40.0f};
  mem::retro_cca(q, kv, kv, out, lse, opt);
  double worst = 0, lead = 0;
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t e = 0; e < Dt; ++e) {
      if (i < m - 1) lead = std::max(lead, double(std::fabs(out(0, 0, i, e))));
      else worst = std::max(worst, double(std::fabs(out(0, 0, i, e) - doc(first * m + i, e))));
    }
  std::printf("3. CCA: tokens 0..%ld read nothing (max |out| = %.1e, lse = %g); tokens %ld..%ld read back their\n"
              "   clean embedding from the previous chunk's neighbours: max error %.2e\n",
              long(m - 2), lead, double(lse(0, 0, 0)), long(m - 1), long(L - 1), worst);
  ok &= lead == 0 && std::isinf(lse(0, 0, 0)) && worst < 0.05;

  // 4. Fast path against the double reference.
  mem::reference::retro_cca(q, kv, kv, out_ref, {}, opt);
  double diff = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) diff = std::max(diff, double(std::fabs(out.data()[i] - out_ref.data()[i])));
  std::printf("4. flash path vs double reference: max |diff| = %.2e\n", diff);
  ok &= diff < 1e-4;

  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
