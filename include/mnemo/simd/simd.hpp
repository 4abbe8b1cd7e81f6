// mnemo/simd/simd.hpp — placeholder, replaced by the SIMD layer
#pragma once
