"""mnemo: CPU attention, KV-cache, linear-attention and memory kernels (header-only C++20), from
NumPy arrays and CPU torch tensors, without copies.

Submodules (all from the extension mnemo._core):
  mnemo.attention  reference, flash, decode, attend (mods as keyword parameters), flash_backward,
                   reference_backward, merge, paged, sigmoid, landmark
  mnemo.kvcache    LayerCache (dense, f32/f16/bf16/int8/int4/int2), PagedCache, decode, apply_rope,
                   policies (every KV policy of mnemo's policy list, by name)
  mnemo.linear     the linear-attention family (every member, recurrent and chunked forms, state in
                   and out, one-token steps), causal_conv1d, selective_scan
  mnemo.memory     Titans neural memory, product-key memory

Errors: every bad argument raises mnemo.Error (a ValueError) whose message names the function and
the argument, e.g. "attention::flash: k.shape[1] (Hkv) must divide q.shape[1] (Hq): ...".
"""
import sys as _sys

from . import _core
from ._core import Error, build_info, last_kernel_ns

attention = _core.attention
kvcache = _core.kvcache
linear = _core.linear
memory = _core.memory

for _name in ("attention", "kvcache", "linear", "memory"):
    _sys.modules[__name__ + "." + _name] = getattr(_core, _name)

__version__ = "0.1.0"
__all__ = ["Error", "attention", "kvcache", "linear", "memory", "build_info", "last_kernel_ns"]
