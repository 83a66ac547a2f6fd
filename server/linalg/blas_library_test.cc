// What GetBlasLibraryInfo reads from the linked OpenBLAS and the process
// environment, and the start-up line made of it. That an environment's
// OPENBLAS_CORETYPE really changes the reported kernels is checked on the
// real server binary (tests/ops/operations_test.cc, Metrics.BlasInfoGauge).
#include "server/linalg/blas_library.h"

#include <cstdlib>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace natgrad::linalg {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

TEST(BlasLibrary, ReportsTheLinkedOpenBlasAndItsKernels) {
  const BlasLibraryInfo& info = GetBlasLibraryInfo();
  EXPECT_THAT(info.config, StartsWith("OpenBLAS"));
  EXPECT_FALSE(info.core.empty());
  const char* env = std::getenv("OPENBLAS_CORETYPE");
  EXPECT_EQ(info.coretype_env, env == nullptr ? "" : env);
  EXPECT_EQ(&info, &GetBlasLibraryInfo());  // read once
}

TEST(BlasLibrary, DescriptionSaysWhetherTheKernelsWereDetectedOrForced) {
  BlasLibraryInfo detected{"OpenBLAS 0.3.21 DYNAMIC_ARCH", "Cooperlake", ""};
  EXPECT_EQ(DescribeBlasLibrary(detected),
            "OpenBLAS 0.3.21 DYNAMIC_ARCH, kernels Cooperlake (detected for this CPU)");
  BlasLibraryInfo forced{"OpenBLAS 0.3.21 DYNAMIC_ARCH", "Haswell", "Haswell"};
  const std::string line = DescribeBlasLibrary(forced);
  EXPECT_THAT(line, StartsWith("OpenBLAS 0.3.21 DYNAMIC_ARCH, kernels Haswell "));
  EXPECT_THAT(line, HasSubstr("OPENBLAS_CORETYPE=Haswell in the environment"));
  EXPECT_THAT(line, Not(HasSubstr("detected")));
  EXPECT_EQ(DescribeBlasLibrary(BlasLibraryInfo{}), "unknown BLAS, kernels unknown (detected for this CPU)");
}

}  // namespace
}  // namespace natgrad::linalg
