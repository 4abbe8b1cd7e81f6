# cmake -DMODE=find_package|add_subdirectory -DMNEMO_SOURCE=... -DCONSUMER_SOURCE=... -DWORK=... -P run_consumer.cmake
cmake_minimum_required(VERSION 3.21)

function(step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK}")
# Release at -O1: these builds check packaging (targets, install tree, the prebuilt library's
# dispatch), not speed, and the prebuilt library's kernels took most of CI's packaging minutes at -O3.
set(common -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG" -DCMAKE_CXX_COMPILER=${CXX})

if(MODE STREQUAL "find_package")
  # Build nothing but the package, install it into a temporary prefix.
  step("${CMAKE_COMMAND}" -S "${MNEMO_SOURCE}" -B "${WORK}/mnemo-build" ${common}
       -DMNEMO_BUILD_TESTS=OFF -DMNEMO_BUILD_BENCH=OFF -DMNEMO_BUILD_EXAMPLES=OFF
       "-DCMAKE_INSTALL_PREFIX=${WORK}/prefix")
  step("${CMAKE_COMMAND}" --build "${WORK}/mnemo-build")
  step("${CMAKE_COMMAND}" --install "${WORK}/mnemo-build")
  if(NOT EXISTS "${WORK}/prefix/share/cmake/mnemo/mnemoConfig.cmake")
    message(FATAL_ERROR "install did not produce share/cmake/mnemo/mnemoConfig.cmake")
  endif()
  step("${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE}" -B "${WORK}/consumer-build" ${common}
       -DMNEMO_CONSUMER_MODE=find_package "-DCMAKE_PREFIX_PATH=${WORK}/prefix" -DMNEMO_CONSUMER_PREBUILT=${PREBUILT})
elseif(MODE STREQUAL "add_subdirectory")
  step("${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE}" -B "${WORK}/consumer-build" ${common}
       -DMNEMO_CONSUMER_MODE=add_subdirectory "-DMNEMO_SOURCE_DIR=${MNEMO_SOURCE}")
else()
  message(FATAL_ERROR "MODE must be find_package or add_subdirectory, got '${MODE}'")
endif()

step("${CMAKE_COMMAND}" --build "${WORK}/consumer-build")
step("${WORK}/consumer-build/consumer")
if(PREBUILT)
  step("${WORK}/consumer-build/consumer_baseline_isa")
endif()
message(STATUS "consumer (${MODE}) built and ran")
