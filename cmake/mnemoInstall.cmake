# install() + export + mnemoConfig.cmake so that find_package(mnemo CONFIG REQUIRED) works.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS mnemo mnemo_native EXPORT mnemoTargets)
set(MNEMO_PREBUILT_INSTALLED OFF)
set(MNEMO_CONFIG_NEEDS_OPENMP OFF)
if(TARGET mnemo_prebuilt AND PROJECT_IS_TOP_LEVEL)
  install(TARGETS mnemo_prebuilt EXPORT mnemoTargets ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}")
  set(MNEMO_PREBUILT_INSTALLED ON)
  if(OpenMP_CXX_FOUND)
    set(MNEMO_CONFIG_NEEDS_OPENMP ON)
  endif()
endif()
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/mnemo" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")

set(MNEMO_CMAKE_DIR "${CMAKE_INSTALL_DATADIR}/cmake/mnemo")  # header-only: arch-independent location
install(EXPORT mnemoTargets NAMESPACE mnemo:: DESTINATION "${MNEMO_CMAKE_DIR}")
# mnemo::distributed (built when MPI was found) in an export file of its own, which mnemoConfig
# includes only where the consumer's find_package(MPI) succeeds: find_package(mnemo) never needs MPI.
if(TARGET mnemo_distributed)
  install(TARGETS mnemo_distributed EXPORT mnemoDistributedTargets)
  install(EXPORT mnemoDistributedTargets NAMESPACE mnemo:: DESTINATION "${MNEMO_CMAKE_DIR}")
endif()

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/mnemoConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/mnemoConfig.cmake" INSTALL_DESTINATION "${MNEMO_CMAKE_DIR}")
# Header-only unless the prebuilt library is installed beside the headers.
set(mnemo_arch_independent ARCH_INDEPENDENT)
if(MNEMO_PREBUILT_INSTALLED)
  set(mnemo_arch_independent "")
endif()
write_basic_package_version_file("${PROJECT_BINARY_DIR}/mnemoConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion ${mnemo_arch_independent})
install(FILES "${PROJECT_BINARY_DIR}/mnemoConfig.cmake" "${PROJECT_BINARY_DIR}/mnemoConfigVersion.cmake"
  DESTINATION "${MNEMO_CMAKE_DIR}")
