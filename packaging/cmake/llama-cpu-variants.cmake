# Injected into llama-cpp-python's top-level project (CMAKE_PROJECT_INCLUDE) by build-llama-aarch64.sh.
# With GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS, ggml builds one CPU backend per ARM feature level
# (ggml-cpu-armv8.0_1, -armv8.2_1 with dotprod, ...) as loadable modules, and at run time loads the one
# whose features this CPU has with the highest score. llama-cpp-python 0.3.36 installs only a target named
# ggml-cpu, which this build does not have: install every variant next to libggml-base.so, with $ORIGIN
# as their run path, once all targets exist (deferred to the end of the top-level directory).
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL _edge_agent_install_cpu_variants)
function(_edge_agent_install_cpu_variants)
  foreach(_v IN ITEMS armv8.0_1 armv8.2_1 armv8.2_2 armv8.2_3 armv8.6_1 armv8.6_2 armv9.2_1 armv9.2_2)
    if(TARGET ggml-cpu-${_v})
      set_target_properties(ggml-cpu-${_v} PROPERTIES INSTALL_RPATH "$ORIGIN" BUILD_WITH_INSTALL_RPATH TRUE)
      install(TARGETS ggml-cpu-${_v} LIBRARY DESTINATION ${SKBUILD_PLATLIB_DIR}/llama_cpp/lib)
      message(STATUS "edge-agent: installing CPU variant ggml-cpu-${_v}")
    endif()
  endforeach()
endfunction()
