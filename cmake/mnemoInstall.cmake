# install() + export + mnemoConfig.cmake so that find_package(mnemo CONFIG REQUIRED) works.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS mnemo mnemo_native EXPORT mnemoTargets)
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/mnemo" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")

set(MNEMO_CMAKE_DIR "${CMAKE_INSTALL_DATADIR}/cmake/mnemo")  # header-only: arch-independent location
install(EXPORT mnemoTargets NAMESPACE mnemo:: DESTINATION "${MNEMO_CMAKE_DIR}")

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/mnemoConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/mnemoConfig.cmake" INSTALL_DESTINATION "${MNEMO_CMAKE_DIR}")
write_basic_package_version_file("${PROJECT_BINARY_DIR}/mnemoConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/mnemoConfig.cmake" "${PROJECT_BINARY_DIR}/mnemoConfigVersion.cmake"
  DESTINATION "${MNEMO_CMAKE_DIR}")
