// src/prebuilt/avx512.cpp — the AVX-512 level of mnemo::prebuilt (compiled with the AVX-512 F/BW/DQ/VL/CD flags).
#include "kernels.inc"
