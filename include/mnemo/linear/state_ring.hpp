// mnemo/linear/state_ring.hpp — rolling a recurrent state back by n tokens, for speculative
// decoding (a draft of k tokens is stepped through the layer; the verifier accepts some and the
// state must return to where the rejected ones began).
//
// A decoding step maps a state to the next one. state_ring<R> keeps the current state and the
// `depth` states before it in depth + 1 slots of one buffer, and hands each step the slot to read
// and the slot to write:
//
//   linear::state_ring<3> ring({B, Dm, N}, 4);          // up to 4 steps can be undone
//   ... fill ring.state() (zeros, or the final state of a prefill) ...
//   for (each drafted token) {
//     auto [in, out] = ring.advance();                  // in: the current state, out: the next slot
//     linear::selective_scan_step(..., in, out);       // out-of-place step: reads in, writes out
//   }
//   ring.rollback(rejected);                            // the state before the rejected tokens
//
// Every one-token step of the linear family takes a separate state_in and state_out:
// linear_attn_step, retention_step, simple_gla_step, gla_step, delta_rule_step,
// gated_delta_rule_step, kda_step, causal_conv1d_step and selective_scan_step. They read one slot and write another, the same
// memory traffic as an in-place step (and bit for bit its result), so keeping the history costs no
// copy; state_in and state_out may also be the same view (in place), any other overlap is rejected
// with mnemo::error. Memory: (depth + 1) states. Rolling back n <= available() steps is an index
// change; the slots of the undone states are reused by the next advance().
#pragma once

#include <cstdint>
#include <utility>

#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::linear {

template <int R>
class state_ring {
 public:
  // Slots for a state of `shape` (zeros) and the `depth` states before it; depth >= 1.
  state_ring(shape_t<R> shape, std::int64_t depth) : shape_(shape), depth_(depth) {
    mnemo::detail::require(depth >= 1, "linear::state_ring: depth must be >= 1, got ", depth);
    std::int64_t n = 1;
    for (std::int64_t e : shape) {
      mnemo::detail::require(e >= 0, "linear::state_ring: shape must be >= 0, got ", shape_string(shape));
      n *= e;
    }
    size_ = n;
    slots_ = tensor<float, 1>({(depth + 1) * n});
  }

  // The current state (writable: fill it before the first step, or after a prefill).
  view<float, R> state() { return slot(current_); }

  // Moves to the next slot: returns {the current state, the slot the step must write}. The oldest
  // kept state is dropped when depth states are already kept.
  std::pair<view<const float, R>, view<float, R>> advance() {
    const std::int64_t next = (current_ + 1) % (depth_ + 1);
    std::pair<view<const float, R>, view<float, R>> io{slot(current_), slot(next)};
    current_ = next;
    if (available_ < depth_) ++available_;
    return io;
  }

  // How many steps rollback() can undo: the steps since construction, capped at depth, minus
  // what was rolled back already.
  std::int64_t available() const { return available_; }
  std::int64_t depth() const { return depth_; }

  // Makes the state of n steps ago current; 0 <= n <= available().
  void rollback(std::int64_t n) {
    mnemo::detail::require(n >= 0 && n <= available_, "linear::state_ring::rollback: n must be in [0, ", available_,
                           "] (the steps kept), got ", n);
    current_ = (current_ - n % (depth_ + 1) + depth_ + 1) % (depth_ + 1);
    available_ -= n;
  }

 private:
  view<float, R> slot(std::int64_t i) { return {slots_.data() + i * size_, shape_}; }

  shape_t<R> shape_;
  std::int64_t depth_;
  std::int64_t size_ = 0;
  tensor<float, 1> slots_;
  std::int64_t current_ = 0;
  std::int64_t available_ = 0;
};

}  // namespace mnemo::linear
