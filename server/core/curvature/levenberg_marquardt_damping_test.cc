#include "server/core/curvature/levenberg_marquardt_damping.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace natgrad::core {
namespace {

using ::testing::HasSubstr;

LevenbergMarquardtDamping Make(int64_t interval, double initial = 1.0) {
  LevenbergMarquardtOptions o;
  o.initial_damping = initial;
  o.interval = interval;
  o.decay = 0.9;
  o.min_damping = 1e-3;
  o.max_damping = 10;
  auto lm = LevenbergMarquardtDamping::Create(o);
  EXPECT_TRUE(lm.ok()) << lm.status();
  return *lm;
}

// Runs step t reporting `loss`, then commits an update predicted to change
// the loss by `predicted`. Returns the damping step t used.
double Step(LevenbergMarquardtDamping& lm, int64_t t, double loss,
            double predicted) {
  const double lambda = lm.BeginStep(t, loss);
  lm.EndStep(t, predicted);
  return lambda;
}

TEST(KfacLevenbergMarquardtDamping, GoodModelShrinksBadModelGrowsMiddleKeeps) {
  // interval 1: omega = 0.9. Each update predicts -1.
  LevenbergMarquardtDamping lm = Make(1);
  EXPECT_DOUBLE_EQ(Step(lm, 1, 10.0, -1.0), 1.0);
  // Step 1's update lowered the loss by 0.9: rho = 0.9 > 3/4.
  EXPECT_DOUBLE_EQ(Step(lm, 2, 9.1, -1.0), 0.9);
  EXPECT_DOUBLE_EQ(*lm.last_rho(), 0.9 / 1.0);
  // rho = 0.5: unchanged.
  EXPECT_DOUBLE_EQ(Step(lm, 3, 8.6, -1.0), 0.9);
  // rho = 0.1 < 1/4: lambda / omega.
  EXPECT_DOUBLE_EQ(Step(lm, 4, 8.5, -1.0), 1.0);
  // The loss went up: rho < 0.
  EXPECT_DOUBLE_EQ(Step(lm, 5, 9.0, -1.0), 1.0 / 0.9);
  // A non-finite loss counts as a bad model.
  EXPECT_DOUBLE_EQ(Step(lm, 6, INFINITY, -1.0), 1.0 / 0.81);
}

TEST(KfacLevenbergMarquardtDamping, AdaptsOnlyEveryIntervalWithOmegaPower) {
  LevenbergMarquardtDamping lm = Make(3);
  EXPECT_DOUBLE_EQ(lm.omega(), 0.729);
  // Perfect model every step; only step 3's update (judged at 4) counts.
  double loss = 10;
  for (int t = 1; t <= 3; ++t) {
    EXPECT_DOUBLE_EQ(Step(lm, t, loss, -1.0), 1.0) << t;
    loss -= 1.0;
  }
  EXPECT_DOUBLE_EQ(Step(lm, 4, loss, -1.0), 0.729);
  loss -= 1.0;
  EXPECT_DOUBLE_EQ(Step(lm, 5, loss, -1.0), 0.729);
}

TEST(KfacLevenbergMarquardtDamping, JudgesAtSaysWhenTheLossCanMoveTheDamping) {
  // The session proposes early with damping() unless JudgesAt: then any
  // loss must give damping() back.
  LevenbergMarquardtDamping lm = Make(3);
  double loss = 10;
  for (int t = 1; t <= 8; ++t) {
    const bool judges = lm.JudgesAt(t);
    EXPECT_EQ(judges, t == 4 || t == 7) << t;  // after the measured steps 3 and 6
    if (!judges) {
      for (double other : {-1e3, 0.0, 1e3}) {
        LevenbergMarquardtDamping copy = lm;
        EXPECT_EQ(copy.BeginStep(t, other), lm.damping()) << t;
      }
    }
    Step(lm, t, loss, -1.0);
    loss -= 0.1;  // rho = 0.1: every judgement grows the damping
  }
  // A measured update predicted not to lower the loss is never judged.
  LevenbergMarquardtDamping flat = Make(1);
  Step(flat, 1, 10, 0.0);
  EXPECT_FALSE(flat.JudgesAt(2));
}

TEST(KfacLevenbergMarquardtDamping, ClipsAndSkipsWhatItCannotJudge) {
  LevenbergMarquardtDamping lm = Make(1, 0.0011);
  Step(lm, 1, 10, -1);
  EXPECT_DOUBLE_EQ(Step(lm, 2, 9, -1), 1e-3);  // 0.00099 clipped to min
  // No loss at step 3: step 2's update is not judged.
  EXPECT_DOUBLE_EQ(lm.BeginStep(3, std::nullopt), 1e-3);
  lm.EndStep(3, -1);
  EXPECT_DOUBLE_EQ(Step(lm, 4, 100, -1), 1e-3);  // step 3 had no loss
  // rho = 0.5 for step 4's update; step 5's predicts no change and so
  // cannot be judged.
  EXPECT_DOUBLE_EQ(Step(lm, 5, 99.5, 0.0), 1e-3);
  EXPECT_DOUBLE_EQ(Step(lm, 6, 200, -1), 1e-3);
  LevenbergMarquardtDamping big = Make(1, 1e6);
  EXPECT_DOUBLE_EQ(big.damping(), 10);  // initial clipped to max
}

TEST(KfacLevenbergMarquardtDamping, OptionsValidation) {
  LevenbergMarquardtOptions o;
  o.initial_damping = 1e-3;
  auto lm = LevenbergMarquardtDamping::Create(o);
  ASSERT_TRUE(lm.ok());
  EXPECT_EQ(lm->options().interval, 5);
  EXPECT_DOUBLE_EQ(lm->omega(), std::pow(0.95, 5));
  o.decay = 1.5;
  EXPECT_THAT(LevenbergMarquardtDamping::Create(o).status().message(),
              HasSubstr("adaptive_damping.decay is 1.5"));
  o.decay = 0.9;
  o.initial_damping = 0;
  EXPECT_EQ(LevenbergMarquardtDamping::Create(o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.initial_damping = 1;
  o.min_damping = 2;
  o.max_damping = 1;
  EXPECT_THAT(LevenbergMarquardtDamping::Create(o).status().message(),
              HasSubstr("max_damping"));
}

TEST(KfacLevenbergMarquardtDamping, ExportImportContinuesIdentically) {
  LevenbergMarquardtDamping a = Make(2), b = Make(2);
  Step(a, 1, 10, -1);
  Step(a, 2, 9, -1);  // measured, judged at 3
  auto state = a.ExportState();
  EXPECT_EQ(state.at("measured_step"), 2);
  ASSERT_TRUE(b.ImportState(state).ok());
  EXPECT_EQ(b.ExportState(), state);
  EXPECT_DOUBLE_EQ(Step(a, 3, 8.95, -1), Step(b, 3, 8.95, -1));
  EXPECT_DOUBLE_EQ(a.damping(), 1.0 / 0.81);
  EXPECT_EQ(a.ExportState(), b.ExportState());

  auto bad = state;
  bad["damping"] = 1e9;
  EXPECT_FALSE(b.ImportState(bad).ok());
  bad = state;
  bad["bogus"] = 1;
  EXPECT_FALSE(b.ImportState(bad).ok());
  bad = state;
  bad.erase("measured_loss");
  EXPECT_FALSE(b.ImportState(bad).ok());
}

}  // namespace
}  // namespace natgrad::core
