// mnemo/memory/retro.hpp — RETRO's chunked cross-attention and its retrieval database (Borgeaud
// et al., "Improving language models by retrieving from trillions of tokens", ICML 2022, §2.3-2.4
// and Listing 1).
//
// Retrieval. The database holds chunks: for each, a key (the frozen embedding of the chunk, e.g.
// BERT's mean-pooled tokens) and its r payload tokens (the neighbour chunk N and its continuation
// F, [N, F]). The input x of L tokens is cut into chunks C_u of m tokens; each chunk's embedding
// retrieves its k nearest database chunks by the inner product of the embeddings,
//   Ret(C_u) = the k entries with the largest key . e(C_u)          (exact: memory/knn.hpp;
//                                                                    approximate: memory/knn_ivf.hpp)
// whose payloads, encoded by the caller's encoder, are E_u in R^{k x r x d}. Here the k neighbours
// of chunk u are concatenated in time (the paper merges the neighbour and time dimensions), so
// chunk u owns the N = k r neighbour rows [u N, (u + 1) N) of k_nb, v_nb.
//
// Chunked cross-attention (CCA). Token i (0-based) of chunk floor(i / m) attends to the neighbours
// of the chunk that holds position i - m + 1:
//   c(i) = floor((i + 1) / m) - 1                                   (c(i) = -1 for i < m - 1)
//   CCA(H, E)_i = sum_j softmax_j(scale q_i . k_{c(i), j}) v_{c(i), j}   over the N rows of E_{c(i)}
// so the attending chunk H_u^+ = (h_{u m + m - 1}, ..., h_{u m + 2m - 2}) is the last token of
// chunk u and the first m - 1 tokens of chunk u + 1 (the paper's 1-based h_{um+i-1}, i in [1, m]),
// and the last token of the sequence reads E_{l-1} when L = l m (the paper's closing remark).
// Causality: chunk c(i) ends at position (c(i) + 1) m - 1 <= i, so no token reads the neighbours
// of a chunk it has not finished seeing. The first m - 1 tokens attend to nothing: out = 0 and
// lse = -inf (Listing 1's zero padding; the paper's CCA is a residual operator, so its identity
// h_j on those tokens is the caller's residual h + out). Neighbour sets of chunks that no token
// reads yet (the last chunk, and a partial chunk) may be passed and are ignored.
//
// Shapes: q [B, Hq, L, D] (the decoder's queries), k_nb [B, Hkv, C N, D], v_nb [B, Hkv, C N, Dv]
// (the encoded neighbours' keys and values, chunk-major, C >= floor(L / m)), out [B, Hq, L, Dv],
// lse [B, Hq, L]; Hq a multiple of Hkv (GQA as everywhere in attention/).
// Paths: reference::retro_cca loops over tokens in double; the fast path is attention::flash
// over strided views: the attending chunks of one sequence, [C', Hq, m, D] with chunk stride m
// rows, against their neighbour sets [C', Hkv, N, D], so one flash call covers every full
// attending chunk of a sequence (and one more the partial last one). The paper's relative
// positions inside CCA are not applied (absolute-position cross-attention, as attention/flash).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "mnemo/attention/flash.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"
#include "mnemo/memory/knn.hpp"
#include "mnemo/memory/knn_ivf.hpp"

namespace mnemo::memory {

struct retro_options {
  std::int64_t chunk_len = 64;     // m >= 1 (the paper: 64)
  std::int64_t neighbour_len = 0;  // N = k r >= 1: neighbour rows per chunk (the paper: 2 x 128)
  float scale = 0;                 // 0: 1 / sqrt(D)
  int threads = 0;                 // 0: the OpenMP default
};

// The chunk whose neighbours token i reads: floor((i + 1) / m) - 1, or -1 (none) for i < m - 1.
inline std::int64_t retro_source_chunk(std::int64_t i, std::int64_t m) { return (i + 1) / m - 1; }

namespace detail {

struct retro_dims {
  std::int64_t B, Hq, Hkv, L, D, Dv, m, N, chunks;
  float scale;
};

inline retro_dims check_retro_cca(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                                  const view<const float, 4>& v, const view<float, 4>& out, const view<float, 3>& lse,
                                  const retro_options& opt) {
  using mnemo::detail::require;
  require(opt.chunk_len >= 1, fn, ": options.chunk_len must be >= 1, got ", opt.chunk_len);
  require(opt.neighbour_len >= 1, fn, ": options.neighbour_len (k r) must be >= 1, got ", opt.neighbour_len);
  require(std::isfinite(opt.scale) && opt.scale >= 0, fn, ": options.scale must be finite and >= 0 (0: 1/sqrt(D)), got ",
          opt.scale);
  check_threads(fn, opt.threads);
  const std::int64_t B = q.extent(0), Hq = q.extent(1), L = q.extent(2), D = q.extent(3), Hkv = k.extent(1);
  const std::int64_t Lk = k.extent(2), Dv = v.extent(3), m = opt.chunk_len, N = opt.neighbour_len;
  require(D >= 1 && Dv >= 1, fn, ": D (q.shape[3]) and Dv (v.shape[3]) must be >= 1, got D=", D, ", Dv=", Dv);
  require(Hkv >= 1 && Hq % Hkv == 0, fn, ": q.shape[1] (Hq) must be a multiple of k_nb.shape[1] (Hkv), got Hq=", Hq,
          ", Hkv=", Hkv);
  mnemo::detail::require_shape(fn, "k_nb", k, {B, Hkv, Lk, D}, " [B, Hkv, C N, D] (B, D from q)");
  require(Lk % N == 0 && Lk / N >= L / m, fn, ": k_nb.shape[2] must be C N with N = neighbour_len = ", N,
          " and C >= floor(L / m) = ", L / m, " chunks, got ", Lk);
  mnemo::detail::require_shape(fn, "v_nb", v, {B, Hkv, Lk, Dv}, " [B, Hkv, C N, Dv] (from k_nb)");
  mnemo::detail::require_shape(fn, "out", out, {B, Hq, L, Dv}, " [B, Hq, L, Dv]");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, {B, Hq, L}, " [B, Hq, L]");
  const float scale = opt.scale != 0 ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  return {B, Hq, Hkv, L, D, Dv, m, N, Lk / N, scale};
}

}  // namespace detail

namespace reference {

// CCA token by token in double (see the header).
inline void retro_cca(view<const float, 4> q,     // [B, Hq, L, D]
                      view<const float, 4> k_nb,  // [B, Hkv, C N, D]
                      view<const float, 4> v_nb,  // [B, Hkv, C N, Dv]
                      view<float, 4> out,         // [B, Hq, L, Dv]
                      view<float, 3> lse,         // [B, Hq, L] or empty
                      const retro_options& opt) {
  const auto d = detail::check_retro_cca("memory::reference::retro_cca", q, k_nb, v_nb, out, lse, opt);
  parallel_for(d.B * d.Hq, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / (d.Hq / d.Hkv);
    std::vector<double> s(static_cast<std::size_t>(d.N)), acc(static_cast<std::size_t>(d.Dv));
    for (std::int64_t i = 0; i < d.L; ++i) {
      const std::int64_t c = retro_source_chunk(i, d.m);
      float* o = out.ptr(b, h, i);
      if (c < 0) {  // the first m - 1 tokens: no finished chunk before them
        std::fill(o, o + d.Dv, 0.0f);
        if (!lse.empty()) lse(b, h, i) = detail::minus_inf;
        continue;
      }
      double mx = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < d.N; ++j) {
        double dot = 0;
        for (std::int64_t e = 0; e < d.D; ++e) dot += static_cast<double>(q(b, h, i, e)) * k_nb(b, hk, c * d.N + j, e);
        s[j] = d.scale * dot;
        mx = std::max(mx, s[j]);
      }
      double z = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (std::int64_t j = 0; j < d.N; ++j) {
        const double p = std::exp(s[j] - mx);
        z += p;
        for (std::int64_t e = 0; e < d.Dv; ++e) acc[e] += p * v_nb(b, hk, c * d.N + j, e);
      }
      for (std::int64_t e = 0; e < d.Dv; ++e) o[e] = static_cast<float>(acc[e] / z);
      if (!lse.empty()) lse(b, h, i) = static_cast<float>(mx + std::log(z));
    }
  }, opt.threads);
}

}  // namespace reference

// CCA through attention::flash over strided chunk views; same contract as reference::retro_cca.
template <class Arch = simd::default_arch>
void retro_cca(view<const float, 4> q,     // [B, Hq, L, D]
               view<const float, 4> k_nb,  // [B, Hkv, C N, D]
               view<const float, 4> v_nb,  // [B, Hkv, C N, Dv]
               view<float, 4> out,         // [B, Hq, L, Dv]
               view<float, 3> lse,         // [B, Hq, L] or empty
               const retro_options& opt) {
  const auto d = detail::check_retro_cca("memory::retro_cca", q, k_nb, v_nb, out, lse, opt);
  const attention::options aopt{.scale = d.scale, .threads = opt.threads};
  const std::int64_t m = d.m, N = d.N, lead = std::min(d.L, m - 1);
  const std::int64_t rows = d.L - lead, full = rows / m, rest = rows % m;
  for (std::int64_t b = 0; b < d.B; ++b) {
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t i = 0; i < lead; ++i) {
        std::fill(out.ptr(b, h, i), out.ptr(b, h, i) + d.Dv, 0.0f);
        if (!lse.empty()) lse(b, h, i) = detail::minus_inf;
      }
    // Attending chunk u (rows lead + u m ...) reads neighbour set u: the chunk index becomes the
    // batch dimension of flash, through a stride of m query rows and N neighbour rows.
    const auto run = [&](std::int64_t u0, std::int64_t n_chunks, std::int64_t len) {
      const std::int64_t r0 = lead + u0 * m;
      const view<const float, 4> qc(q.ptr(b, 0, r0), {n_chunks, d.Hq, len, d.D},
                                    {m * q.stride(2), q.stride(1), q.stride(2), 1});
      const view<const float, 4> kc(k_nb.ptr(b, 0, u0 * N), {n_chunks, d.Hkv, N, d.D},
                                    {N * k_nb.stride(2), k_nb.stride(1), k_nb.stride(2), 1});
      const view<const float, 4> vc(v_nb.ptr(b, 0, u0 * N), {n_chunks, d.Hkv, N, d.Dv},
                                    {N * v_nb.stride(2), v_nb.stride(1), v_nb.stride(2), 1});
      const view<float, 4> oc(out.ptr(b, 0, r0), {n_chunks, d.Hq, len, d.Dv},
                              {m * out.stride(2), out.stride(1), out.stride(2), 1});
      view<float, 3> lc;
      if (!lse.empty()) lc = view<float, 3>(lse.ptr(b, 0, r0), {n_chunks, d.Hq, len}, {m * lse.stride(2), lse.stride(1), 1});
      attention::flash<float, attention::mods::none, Arch>(qc, kc, vc, oc, lc, {}, aopt);
    };
    if (full > 0) run(0, full, m);
    if (rest > 0) run(full, 1, rest);
  }
}

// ---------------------------------------------------------------------------------------------
// The retrieval database.

// Chunk keys in a kNN memory (one "head", FIFO over `capacity` chunks) and each chunk's r payload
// tokens [capacity, r, Dt] in the same slot. Retrieval returns slots; position(slot) is the
// chunk's insertion index.
class retro_database {
 public:
  retro_database() = default;
  retro_database(std::int64_t key_dim, std::int64_t payload_len, std::int64_t payload_dim, std::int64_t capacity)
      : keys_(1, 1, key_dim, 1, capacity), payload_({capacity, payload_len, payload_dim}) {
    mnemo::detail::require(payload_len >= 1 && payload_dim >= 1, "retro_database: payload_len (r) and payload_dim must be >= 1, got r=",
                           payload_len, ", payload_dim=", payload_dim);
  }

  std::int64_t size() const { return keys_.size(); }
  std::int64_t capacity() const { return keys_.capacity(); }
  std::int64_t key_dim() const { return keys_.key_dim(); }
  std::int64_t payload_len() const { return payload_.extent(1); }
  std::int64_t payload_dim() const { return payload_.extent(2); }
  const knn_memory& keys() const { return keys_; }
  view<const float, 3> payload() const { return payload_; }  // [capacity, r, Dt]

  // Adds n chunks: their keys [n, De] and payload tokens [n, r, Dt] (the oldest dropped beyond capacity).
  void add(view<const float, 2> keys, view<const float, 3> payload) {
    constexpr const char* fn = "retro_database::add";
    mnemo::detail::require(capacity() >= 1, fn, ": the database is empty (default-constructed)");
    const std::int64_t n = keys.extent(0);
    mnemo::detail::require_shape(fn, "keys", keys, {n, key_dim()}, " [n, De]");
    mnemo::detail::require_shape(fn, "payload", payload, {n, payload_len(), payload_dim()}, " [n, r, Dt]");
    // knn_memory writes pair t of this call to slot (total_added + t) mod capacity.
    const std::int64_t first = keys_.total_added();
    for (std::int64_t t = std::max<std::int64_t>(0, n - capacity()); t < n; ++t) {
      const std::int64_t slot = (first + t) % capacity();
      for (std::int64_t j = 0; j < payload_len(); ++j)
        std::copy(payload.ptr(t, j), payload.ptr(t, j) + payload_dim(), payload_.as_view().ptr(slot, j));
    }
    ones_.assign(static_cast<std::size_t>(n), 1.0f);
    keys_.add(view<const float, 4>(keys.data(), {1, 1, n, key_dim()}, {0, 0, keys.stride(0), 1}),
              view<const float, 4>(ones_.data(), {1, 1, n, 1}));
  }

  // The k nearest chunks (largest key . query, ties: the lower slot) of each query [C, De] into
  // slots [C, k] (-1 where fewer than k are stored). Exact search (memory/knn.hpp).
  template <class Arch = simd::default_arch>
  void retrieve(view<const float, 2> queries, view<std::int64_t, 2> slots, int threads = 0) const {
    const std::int64_t C = queries.extent(0), k = slots.extent(1);
    mnemo::detail::require_shape(retrieve_fn, "slots", slots, {C, k}, " [C, k]");
    knn_search<Arch>(as4(queries), keys_, k, as4(slots), {}, threads);
  }

  // The same through an IVF index built over keys() (memory/knn_ivf.hpp): approximate for n_probe < n_lists.
  template <class Arch = simd::default_arch>
  void retrieve(view<const float, 2> queries, const knn_index& index, std::int64_t n_probe, view<std::int64_t, 2> slots,
                int threads = 0) const {
    const std::int64_t C = queries.extent(0), k = slots.extent(1);
    mnemo::detail::require_shape(retrieve_fn, "slots", slots, {C, k}, " [C, k]");
    knn_search_ivf<Arch>(as4(queries), keys_, index, n_probe, k, as4(slots), {}, threads);
  }

  // E_u before encoding: the payloads of chunk u's k slots, concatenated in time, into rows
  // [u k r, (u + 1) k r) of out [C k r, Dt]; a missing slot (-1) gives zero rows.
  void gather(view<const std::int64_t, 2> slots, view<float, 2> out) const {
    constexpr const char* fn = "retro_database::gather";
    const std::int64_t C = slots.extent(0), k = slots.extent(1), r = payload_len(), Dt = payload_dim();
    mnemo::detail::require_shape(fn, "out", out, {C * k * r, Dt}, " [C k r, Dt]");
    for (std::int64_t u = 0; u < C; ++u)
      for (std::int64_t j = 0; j < k; ++j) {
        const std::int64_t s = slots(u, j);
        mnemo::detail::require(s >= -1 && s < size(), fn, ": slots(", u, ", ", j, ") must be in [-1, ", size(), "), got ", s);
        for (std::int64_t t = 0; t < r; ++t) {
          float* o = out.ptr((u * k + j) * r + t);
          if (s < 0) std::fill(o, o + Dt, 0.0f);
          else std::copy(payload_.as_view().ptr(s, t), payload_.as_view().ptr(s, t) + Dt, o);
        }
      }
  }

  // <prefix>keys_*.npy (knn_memory::save) and <prefix>payload.npy.
  void save(const std::string& prefix) const {
    mnemo::detail::require(capacity() >= 1, "retro_database::save: the database is empty (default-constructed)");
    keys_.save(prefix + "keys_");
    npy::save(detail::npy_path(prefix, "payload"), payload_);
  }
  static retro_database load(const std::string& prefix) {
    retro_database db;
    db.keys_ = knn_memory::load(prefix + "keys_");
    db.payload_ = npy::load<float, 3>(detail::npy_path(prefix, "payload"));
    mnemo::detail::require(db.keys_.batch() == 1 && db.keys_.heads() == 1 && db.payload_.extent(0) == db.keys_.capacity(),
                           "retro_database::load: ", prefix, "payload.npy: expected ", db.keys_.capacity(),
                           " chunks (the keys' capacity), got ", db.payload_.extent(0));
    return db;
  }

 private:
  static constexpr const char* retrieve_fn = "retro_database::retrieve";
  template <class T>
  static view<T, 4> as4(view<T, 2> v) {
    return {v.data(), {1, 1, v.extent(0), v.extent(1)}, {0, 0, v.extent(0) > 1 ? v.stride(0) : v.extent(1), 1}};
  }

  knn_memory keys_;
  tensor<float, 3> payload_;
  std::vector<float> ones_;  // the unused value of each knn pair
};

// The chunk embeddings of x [L, D]: the mean of each chunk's m tokens (the last chunk may be
// shorter) into out [ceil(L / m), D] (a stand-in for the paper's frozen BERT embedding).
inline void retro_chunk_means(view<const float, 2> x, std::int64_t m, view<float, 2> out) {
  constexpr const char* fn = "memory::retro_chunk_means";
  mnemo::detail::require(m >= 1, fn, ": m must be >= 1, got ", m);
  const std::int64_t L = x.extent(0), D = x.extent(1), C = (L + m - 1) / m;
  mnemo::detail::require_shape(fn, "out", out, {C, D}, " [ceil(L / m), D]");
  for (std::int64_t u = 0; u < C; ++u) {
    const std::int64_t t0 = u * m, n = std::min(m, L - t0);
    float* o = out.ptr(u);
    std::fill(o, o + D, 0.0f);
    for (std::int64_t t = t0; t < t0 + n; ++t)
      for (std::int64_t e = 0; e < D; ++e) o[e] += x(t, e);
    for (std::int64_t e = 0; e < D; ++e) o[e] /= static_cast<float>(n);
  }
}

}  // namespace mnemo::memory
