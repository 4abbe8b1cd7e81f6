// mnemo/mnemo.hpp — one include for everything.
#pragma once

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/eigen.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/simd.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
