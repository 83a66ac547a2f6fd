// Runs on a machine with a GPU; elsewhere every test skips and says why.
#include "server/engine/cuda_backend.h"

#include <limits>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "server/engine/batching_engine.h"
#include "server/engine/engine_factory.h"
#include "server/engine/engine_test_util.h"

namespace natgrad::engine {
namespace {

using ::natgrad::engine::testing::ExpectEighMatches;
using ::natgrad::engine::testing::ExpectInverseMatches;
using ::natgrad::engine::testing::RandomSpd;
using ::natgrad::engine::testing::SingularPsd;

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> count = CudaDeviceCount();
    if (!count.ok()) GTEST_SKIP() << "no CUDA device: " << count.status().message();
    if (*count == 0) GTEST_SKIP() << "no CUDA device: cudaGetDeviceCount returned 0";
    auto backend = CudaBackend::Create();
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = *std::move(backend);
  }
  std::unique_ptr<CudaBackend> backend_;
};

template <typename Scalar>
void CheckBatch(CudaBackend& backend, DecompositionKind kind, int n, int batch) {
  std::vector<MatrixX<Scalar>> inputs;
  std::vector<BatchJob<Scalar>> jobs(batch);
  for (int i = 0; i < batch; ++i) {
    inputs.push_back(RandomSpd<Scalar>(n, 31 * n + i));
    jobs[i].matrix = inputs.back();
  }
  backend.Run(kind, absl::MakeSpan(jobs));
  for (int i = 0; i < batch; ++i) {
    ASSERT_TRUE(jobs[i].result.ok()) << jobs[i].result.status();
    EXPECT_EQ(jobs[i].result->retries, 0);
    if (kind == DecompositionKind::kEigh) {
      ExpectEighMatches<Scalar>(inputs[i], *jobs[i].result);
    } else {
      ExpectInverseMatches<Scalar>(inputs[i], *jobs[i].result);
    }
  }
}

TEST_F(CudaBackendTest, BatchedEighMatchesOracle) {
  for (int n : {1, 8, 33, 128, 300}) {
    CheckBatch<float>(*backend_, DecompositionKind::kEigh, n, 7);
    CheckBatch<double>(*backend_, DecompositionKind::kEigh, n, 5);
  }
  EXPECT_EQ(backend_->cpu_fallbacks(), 0);
}

TEST_F(CudaBackendTest, BatchedCholeskyInverseMatchesOracle) {
  for (int n : {1, 8, 33, 128, 300}) {
    CheckBatch<float>(*backend_, DecompositionKind::kCholeskyInverse, n, 7);
    CheckBatch<double>(*backend_, DecompositionKind::kCholeskyInverse, n, 5);
  }
  EXPECT_EQ(backend_->cpu_fallbacks(), 0);
}

TEST_F(CudaBackendTest, WorkspacesAreReusedAcrossBatchSizes) {
  // Capacity rounds up to a power of two: 3 then 4 reuse one workspace,
  // then 9 needs a new one; results must stay right throughout.
  for (int batch : {3, 4, 9, 2}) {
    CheckBatch<float>(*backend_, DecompositionKind::kEigh, 40, batch);
    CheckBatch<float>(*backend_, DecompositionKind::kCholeskyInverse, 40, batch);
  }
}

TEST_F(CudaBackendTest, NanJobFailsAloneAndSingularJobIsRetried) {
  std::vector<BatchJob<float>> jobs(4);
  std::vector<Eigen::MatrixXf> inputs;
  for (int i = 0; i < 4; ++i) {
    inputs.push_back(RandomSpd<float>(24, i));
    jobs[i].matrix = inputs[i];
  }
  jobs[1].matrix(0, 3) = std::numeric_limits<float>::quiet_NaN();
  inputs[2] = SingularPsd<float>(24, 6, 9);
  jobs[2].matrix = inputs[2];
  backend_->Run(DecompositionKind::kCholeskyInverse, absl::MakeSpan(jobs));
  EXPECT_EQ(jobs[1].result.status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(jobs[2].result.ok()) << jobs[2].result.status();
  EXPECT_GE(jobs[2].result->retries, 1);
  EXPECT_TRUE(jobs[2].result->matrix.allFinite());
  for (int i : {0, 3}) {
    ASSERT_TRUE(jobs[i].result.ok());
    ExpectInverseMatches<float>(inputs[i], *jobs[i].result);
  }
}

TEST_F(CudaBackendTest, FactoryPicksCudaAndEngineWorks) {
  EngineOptions options;
  options.backend = "cuda";
  auto created = CreateInversionEngine(options);
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->backend, "cuda");
  EXPECT_EQ(created->engine->backend_name(), "cuda");
  std::vector<Eigen::MatrixXd> inputs;
  std::vector<DecompositionFuture<double>> futures;
  for (int i = 0; i < 20; ++i) {
    inputs.push_back(RandomSpd<double>(16 + (i % 2) * 48, i));
    futures.push_back(created->engine->Submit(inputs.back(), DecompositionKind::kEigh));
  }
  for (int i = 0; i < 20; ++i) {
    auto r = futures[i].get();
    ASSERT_TRUE(r.ok()) << r.status();
    ExpectEighMatches<double>(inputs[i], *r);
  }
}

}  // namespace
}  // namespace natgrad::engine
