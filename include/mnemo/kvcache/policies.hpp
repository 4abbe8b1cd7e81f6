// mnemo/kvcache/policies.hpp — every KV-cache policy (kvcache/policies/*.hpp, one per paper).
//
// Each decides only what to keep and returns a kvcache::selection; see policies/common.hpp for
// the observation they read and the decode-time trackers.
#pragma once

#include "mnemo/kvcache/policies/adakv.hpp"
#include "mnemo/kvcache/policies/alisa.hpp"
#include "mnemo/kvcache/policies/chunkkv.hpp"
#include "mnemo/kvcache/policies/common.hpp"
#include "mnemo/kvcache/policies/criticalkv.hpp"
#include "mnemo/kvcache/policies/dms.hpp"
#include "mnemo/kvcache/policies/duo_attention.hpp"
#include "mnemo/kvcache/policies/expected_attention.hpp"
#include "mnemo/kvcache/policies/fastgen.hpp"
#include "mnemo/kvcache/policies/h2o.hpp"
#include "mnemo/kvcache/policies/interface.hpp"
#include "mnemo/kvcache/policies/keydiff.hpp"
#include "mnemo/kvcache/policies/keyformer.hpp"
#include "mnemo/kvcache/policies/knorm.hpp"
#include "mnemo/kvcache/policies/lagkv.hpp"
#include "mnemo/kvcache/policies/leverage.hpp"
#include "mnemo/kvcache/policies/list.hpp"
#include "mnemo/kvcache/policies/pyramidkv.hpp"
#include "mnemo/kvcache/policies/qfilter.hpp"
#include "mnemo/kvcache/policies/scissorhands.hpp"
#include "mnemo/kvcache/policies/simlayerkv.hpp"
#include "mnemo/kvcache/policies/snapkv.hpp"
#include "mnemo/kvcache/policies/streaming_llm.hpp"
#include "mnemo/kvcache/policies/think.hpp"
#include "mnemo/kvcache/policies/tova.hpp"
