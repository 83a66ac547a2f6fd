#include "server/core/curvature/kl_clipping.h"

#include <cmath>
#include <limits>

#include "gtest/gtest.h"

namespace natgrad::core {
namespace {

class FakeUpdate final : public PendingBlockUpdate, public CurvatureModel {
 public:
  FakeUpdate(bool clipped, double term) : clipped_(clipped), term_(term) {}
  const CurvatureModel* curvature() const override {
    return clipped_ ? this : nullptr;
  }
  double KlTerm() const override { return term_; }
  double PredictedReduction(double scale) const override { return scale * term_; }
  BlockStepOutput Commit(double) override { return {}; }

 private:
  bool clipped_;
  double term_;
};

TEST(KfacKlClipping, ScaleIsMinOneSqrtKappaOverSum) {
  EXPECT_EQ(KlClipScale(0.0, 1e-3), 1.0);
  EXPECT_EQ(KlClipScale(1e-4, 1e-3), 1.0);  // under the budget
  EXPECT_EQ(KlClipScale(1e-3, 1e-3), 1.0);
  EXPECT_DOUBLE_EQ(KlClipScale(0.1, 1e-3), 0.1);  // sqrt(1e-3 / 0.1)
  EXPECT_DOUBLE_EQ(KlClipScale(-0.4, 1e-2), std::sqrt(1e-2 / 0.4));
  EXPECT_EQ(KlClipScale(std::numeric_limits<double>::infinity(), 1e-3), 0.0);
  EXPECT_EQ(KlClipScale(std::nan(""), 1e-3), 0.0);
}

TEST(KfacKlClipping, SumsOnlyClippedUpdates) {
  std::vector<std::unique_ptr<PendingBlockUpdate>> updates;
  updates.push_back(std::make_unique<FakeUpdate>(true, 0.25));
  updates.push_back(std::make_unique<FakeUpdate>(false, 100.0));
  updates.push_back(std::make_unique<FakeUpdate>(true, 0.5));
  updates.push_back(nullptr);
  EXPECT_DOUBLE_EQ(KlClipSum(updates), 0.75);
  EXPECT_DOUBLE_EQ(PredictedReductionSum(updates, 2.0), 1.5);
}

TEST(KfacKlClipping, KappaMustBePositive) {
  EXPECT_TRUE(ValidateKlClipKappa(kDefaultKlClipKappa).ok());
  EXPECT_FALSE(ValidateKlClipKappa(0).ok());
  EXPECT_FALSE(ValidateKlClipKappa(-1).ok());
  EXPECT_FALSE(ValidateKlClipKappa(std::nan("")).ok());
  EXPECT_EQ(ValidateKlClipKappa(-1).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace natgrad::core
