// src/prebuilt/avx2.cpp — the AVX2 level of mnemo::prebuilt (compiled with -mavx2 -mfma -mf16c).
#include "kernels.inc"
