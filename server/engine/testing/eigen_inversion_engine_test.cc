#include "server/engine/testing/eigen_inversion_engine.h"

#include <cmath>

#include "gtest/gtest.h"

namespace natgrad::core::testing {
namespace {

using engine::DecompositionKind;

TEST(KfacEigenInversionEngine, EighReconstructsAndClampsAtZero) {
  EigenInversionEngine e;
  Eigen::MatrixXd m(3, 3);
  m << 2, 1, 0, 1, 2, 0, 0, 0, 0;  // eigenvalues 0, 1, 3
  m(2, 2) = -1e-14;                // rounding below zero
  auto r = e.Submit(m, DecompositionKind::kEigh).get();
  ASSERT_TRUE(r.ok());
  EXPECT_NEAR(r->eigenvalues(0), 0.0, 0.0);
  EXPECT_NEAR(r->eigenvalues(1), 1.0, 1e-12);
  EXPECT_NEAR(r->eigenvalues(2), 3.0, 1e-12);
  Eigen::MatrixXd back =
      r->matrix * r->eigenvalues.asDiagonal() * r->matrix.transpose();
  EXPECT_LT((back - m).norm(), 1e-12);
}

TEST(KfacEigenInversionEngine, CholeskyInverseSymmetrisesAndRejects) {
  EigenInversionEngine e;
  Eigen::MatrixXf m(2, 2);
  m << 4, 1.0001f, 0.9999f, 3;  // symmetrised first
  auto r = e.Submit(m, DecompositionKind::kCholeskyInverse).get();
  ASSERT_TRUE(r.ok());
  Eigen::MatrixXf sym(2, 2);
  sym << 4, 1, 1, 3;
  EXPECT_LT((r->matrix * sym - Eigen::MatrixXf::Identity(2, 2)).norm(), 1e-5);

  Eigen::MatrixXd indefinite(2, 2);
  indefinite << 1, 2, 2, 1;
  EXPECT_FALSE(
      e.Submit(indefinite, DecompositionKind::kCholeskyInverse).get().ok());
  Eigen::MatrixXd nan = Eigen::MatrixXd::Identity(2, 2);
  nan(0, 1) = std::nan("");
  auto bad = e.Submit(nan, DecompositionKind::kEigh).get();
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KfacEigenInversionEngine, LazyModeComputesOnWait) {
  EigenInversionEngine e(/*lazy=*/true);
  auto f = e.Submit(Eigen::MatrixXd(Eigen::MatrixXd::Identity(2, 2)),
                    DecompositionKind::kEigh);
  EXPECT_EQ(e.submitted(), 1);
  EXPECT_EQ(e.computed(), 0);
  EXPECT_NE(f.wait_for(std::chrono::seconds(0)), std::future_status::ready);
  EXPECT_TRUE(f.get().ok());
  EXPECT_EQ(e.computed(), 1);
}

}  // namespace
}  // namespace natgrad::core::testing
