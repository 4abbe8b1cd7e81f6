// mnemo/simd/simd.hpp — the SIMD layer in one include.
//
//   arch.hpp   enabled (false under MNEMO_NO_SIMD), default_arch, fbatch<Arch>, width<Arch>
//   math.hpp   exp(batch) and exp(float): Cody-Waite reduction + degree-6 minimax; max error
//              0.89 ulp with FMA, 1.18 ulp without (all 2^32 inputs); same bits scalar and batch
//   load.hpp   load / load_partial / store / store_partial / convert for float, f16, bf16
//   vec.hpp    dot, axpy, scale, reduce_max, reduce_sum, exp_sum, hsum, hmax
//              (vector body + masked tail, f32 accumulation; double references in simd::reference)
//   select.hpp top_k_indices: the one top-k selection (ties to the lower index, NaN last)
//
// Everything is written against xsimd::batch<float, Arch> and templated on Arch; see arch.hpp.
#pragma once

#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"
#include "mnemo/simd/select.hpp"
#include "mnemo/simd/vec.hpp"
