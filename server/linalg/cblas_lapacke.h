// The one place that includes the system's CBLAS and LAPACKE headers
// (internal to server/linalg and to the few .cc files that call LAPACK
// directly: server/engine/lapack_kernels.cc, bench/engine). Include it from
// .cc files only: <cblas.h> brings OpenBLAS's macros and enums with it.
//
// <cblas.h> is the Debian alternative that libopenblas-dev points at
// OpenBLAS's own header, which also declares openblas_set_num_threads /
// openblas_get_num_threads / openblas_get_num_procs. Where cblas.h is
// netlib's (the alternative switched), cblas-openblas.h is still OpenBLAS's.
#ifndef NATGRAD_SERVER_LINALG_CBLAS_LAPACKE_H_
#define NATGRAD_SERVER_LINALG_CBLAS_LAPACKE_H_

#include <complex>

#if __has_include(<cblas-openblas.h>)
#include <cblas-openblas.h>
#else
#include <cblas.h>
#endif

// lapacke.h picks C99 complex types unless told otherwise; nothing here uses
// them, but the declarations must parse as C++.
#define lapack_complex_float std::complex<float>
#define lapack_complex_double std::complex<double>
#include <lapacke.h>

#endif  // NATGRAD_SERVER_LINALG_CBLAS_LAPACKE_H_
