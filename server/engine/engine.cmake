# Implementations of the inversion engine (included by CMakeLists.txt here).

# LAPACKE kernels, CPU backend and the batching dispatcher: always built.
add_library(natgrad_engine_cpu STATIC
  lapack_kernels.cc
  cpu_backend.cc
  batching_engine.cc)
target_include_directories(natgrad_engine_cpu PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(natgrad_engine_cpu
  PUBLIC natgrad_engine_api natgrad_linalg absl::span absl::status absl::statusor
         absl::strings Threads::Threads)

# cuSOLVER backend: host-compiled .cc against the CUDA libraries; the CUDA
# headers stay inside cuda_backend.cc.
set(_natgrad_engine_has_cuda 0)
if(NATGRAD_WITH_CUDA)
  find_package(CUDAToolkit)
  if(CUDAToolkit_FOUND AND TARGET CUDA::cusolver AND TARGET CUDA::cublas)
    add_library(natgrad_engine_cuda STATIC cuda_backend.cc)
    target_include_directories(natgrad_engine_cuda PUBLIC ${PROJECT_SOURCE_DIR})
    target_link_libraries(natgrad_engine_cuda
      PUBLIC natgrad_engine_cpu
      PRIVATE CUDA::cusolver CUDA::cublas CUDA::cudart)
    set(_natgrad_engine_has_cuda 1)
  else()
    message(WARNING "NATGRAD_WITH_CUDA is ON but cuSOLVER/cuBLAS were not found; "
                    "the engine is CPU-only")
  endif()
endif()

# Backend selection (CreateInversionEngine).
add_library(natgrad_engine_factory STATIC engine_factory.cc)
target_include_directories(natgrad_engine_factory PUBLIC ${PROJECT_SOURCE_DIR})
target_compile_definitions(natgrad_engine_factory
  PRIVATE NATGRAD_ENGINE_HAS_CUDA=${_natgrad_engine_has_cuda})
target_link_libraries(natgrad_engine_factory PUBLIC natgrad_engine_cpu)
if(_natgrad_engine_has_cuda)
  target_link_libraries(natgrad_engine_factory PUBLIC natgrad_engine_cuda)
endif()

target_link_libraries(natgrad_engine INTERFACE natgrad_engine_factory)

natgrad_test(lapack_kernels_test SOURCES lapack_kernels_test.cc
  LIBS natgrad_engine_cpu LABELS engine)
natgrad_test(batching_engine_test SOURCES batching_engine_test.cc
  LIBS natgrad_engine_factory LABELS engine)
if(_natgrad_engine_has_cuda)
  natgrad_test(cuda_backend_test SOURCES cuda_backend_test.cc
    LIBS natgrad_engine_factory LABELS engine cuda)
endif()
