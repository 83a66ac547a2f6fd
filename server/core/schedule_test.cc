#include "server/core/schedule.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace natgrad::core {
namespace {

using ::testing::HasSubstr;

constexpr double kPi = 3.14159265358979323846;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNan = std::numeric_limits<double>::quiet_NaN();

SchedulePtr Ok(absl::StatusOr<SchedulePtr> s) {
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : ConstantSchedule(kNan);
}

void ExpectInvalid(const absl::StatusOr<SchedulePtr>& s,
                   const std::string& names) {
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr(names));
}

TEST(ScheduleTest, Constant) {
  SchedulePtr s = ConstantSchedule(0.25);
  for (int64_t t : {1, 2, 1000}) EXPECT_EQ(s->Value(t), 0.25);
}

TEST(ScheduleTest, PiecewiseConstant) {
  SchedulePtr s = Ok(PiecewiseConstantSchedule({3, 10}, {1.0, 0.5, 0.1}));
  EXPECT_EQ(s->Value(1), 1.0);
  EXPECT_EQ(s->Value(2), 1.0);
  EXPECT_EQ(s->Value(3), 0.5);  // boundaries[0] <= t starts values[1]
  EXPECT_EQ(s->Value(9), 0.5);
  EXPECT_EQ(s->Value(10), 0.1);
  EXPECT_EQ(s->Value(100000), 0.1);
  // No boundaries: a constant.
  SchedulePtr c = Ok(PiecewiseConstantSchedule({}, {7.0}));
  EXPECT_EQ(c->Value(1), 7.0);
  EXPECT_EQ(c->Value(50), 7.0);
}

TEST(ScheduleTest, LinearWarmup) {
  const double a = 0.1, b = 1.1;
  const int64_t k = 4;
  SchedulePtr s = Ok(LinearWarmupSchedule(a, b, k));
  for (int64_t t : {1, 2, 3, 4, 5, 100}) {
    const double frac = t >= k ? 1.0 : static_cast<double>(t) / 4.0;
    EXPECT_DOUBLE_EQ(s->Value(t), a + (b - a) * frac) << t;
  }
  EXPECT_DOUBLE_EQ(s->Value(1), 0.35);
  EXPECT_DOUBLE_EQ(s->Value(4), 1.1);
  EXPECT_DOUBLE_EQ(s->Value(9), 1.1);
}

TEST(ScheduleTest, CosineDecay) {
  const double init = 2.0, alpha = 0.1;
  const int64_t steps = 10;
  SchedulePtr s = Ok(CosineDecaySchedule(init, steps, alpha));
  for (int64_t t : {1, 5, 9, 10, 11, 1000}) {
    const double p = static_cast<double>(t < steps ? t : steps) / 10.0;
    const double want =
        init * ((1 - alpha) * 0.5 * (1 + std::cos(kPi * p)) + alpha);
    EXPECT_NEAR(s->Value(t), want, 1e-14) << t;
  }
  EXPECT_NEAR(s->Value(5), 2.0 * (0.9 * 0.5 + 0.1), 1e-14);  // cos(pi/2) = 0
  EXPECT_NEAR(s->Value(10), 0.2, 1e-14);                     // floor alpha
  EXPECT_NEAR(s->Value(50), 0.2, 1e-14);
}

TEST(ScheduleTest, ExponentialDecay) {
  SchedulePtr smooth = Ok(ExponentialDecaySchedule(1.0, 0.5, 4, false));
  SchedulePtr stairs = Ok(ExponentialDecaySchedule(1.0, 0.5, 4, true));
  for (int64_t t : {1, 3, 4, 5, 8, 9, 40}) {
    EXPECT_NEAR(smooth->Value(t), std::pow(0.5, t / 4.0), 1e-15) << t;
    EXPECT_NEAR(stairs->Value(t), std::pow(0.5, std::floor(t / 4.0)), 1e-15)
        << t;
  }
  EXPECT_DOUBLE_EQ(stairs->Value(1), 1.0);
  EXPECT_DOUBLE_EQ(stairs->Value(3), 1.0);
  EXPECT_DOUBLE_EQ(stairs->Value(4), 0.5);
  EXPECT_DOUBLE_EQ(stairs->Value(8), 0.25);
  EXPECT_DOUBLE_EQ(smooth->Value(2), std::sqrt(0.5));
}

TEST(ScheduleTest, PolynomialDecay) {
  const double init = 1.0, end = 0.01, power = 2.0;
  SchedulePtr s = Ok(PolynomialDecaySchedule(init, end, power, 10));
  for (int64_t t : {1, 5, 10, 11, 500}) {
    const double frac = static_cast<double>(t < 10 ? t : 10) / 10.0;
    const double want = (init - end) * (1 - frac) * (1 - frac) + end;
    EXPECT_NEAR(s->Value(t), want, 1e-15) << t;
  }
  EXPECT_NEAR(s->Value(5), 0.99 * 0.25 + 0.01, 1e-15);
  EXPECT_DOUBLE_EQ(s->Value(10), end);
  EXPECT_DOUBLE_EQ(s->Value(11), end);
}

TEST(ScheduleTest, IncreasingRate) {
  const double alpha = 0.5, beta = 0.1;
  SchedulePtr s = Ok(IncreasingRateSchedule(alpha, beta));
  for (int64_t t : {1, 2, 10, 100, 10000}) {
    EXPECT_NEAR(s->Value(t), alpha * (1 - std::exp(-beta * t)), 1e-15) << t;
  }
  EXPECT_NEAR(s->Value(10), 0.5 * (1 - std::exp(-1.0)), 1e-15);
  EXPECT_NEAR(s->Value(10000), alpha, 1e-15);
  // Tiny beta: still accurate relative to alpha*beta*t.
  SchedulePtr tiny = Ok(IncreasingRateSchedule(1.0, 1e-12));
  EXPECT_NEAR(tiny->Value(1) / 1e-12, 1.0, 1e-9);
}

TEST(ScheduleTest, LogLinearWarmup) {
  // Salimbeni's gamma warm-up 1e-4 -> 1e-1 over K = 3 steps: one decade each.
  SchedulePtr s = Ok(LogLinearWarmupSchedule(1e-4, 1e-1, 3));
  EXPECT_NEAR(s->Value(1), 1e-3, 1e-15);
  EXPECT_NEAR(s->Value(2), 1e-2, 1e-14);
  EXPECT_NEAR(s->Value(3), 1e-1, 1e-13);
  EXPECT_NEAR(s->Value(4), 1e-1, 1e-13);
  EXPECT_NEAR(s->Value(1000), 1e-1, 1e-13);
  // General closed form at several t.
  const double a = 2e-3, b = 0.7;
  const int64_t big_k = 7;
  SchedulePtr g = Ok(LogLinearWarmupSchedule(a, b, big_k));
  for (int64_t t : {1, 3, 6, 7, 8, 99}) {
    const double k = static_cast<double>(t < big_k ? t : big_k);
    const double want =
        std::pow(10.0, ((7 - k) * std::log10(a) + k * std::log10(b)) / 7.0);
    EXPECT_NEAR(g->Value(t) / want, 1.0, 1e-13) << t;
  }
}

TEST(ScheduleTest, JoinedWarmupThenCosine) {
  // Linear warm-up 0 -> 1 over 4 steps, then cosine decay over 10 steps.
  SchedulePtr warm = Ok(LinearWarmupSchedule(0.0, 1.0, 4));
  SchedulePtr decay = Ok(CosineDecaySchedule(1.0, 10, 0.0));
  SchedulePtr s = Ok(JoinedSchedule({warm, decay}, {4}));
  auto want = [](int64_t t) {
    if (t <= 4) return static_cast<double>(t) / 4.0;
    const double u = static_cast<double>(t - 4 < 10 ? t - 4 : 10);
    return 0.5 * (1 + std::cos(kPi * u / 10.0));
  };
  for (int64_t t : {1, 2, 3, 4, 5, 9, 14, 15, 100}) {
    EXPECT_NEAR(s->Value(t), want(t), 1e-15) << t;
  }
  EXPECT_DOUBLE_EQ(s->Value(4), 1.0);  // warm-up peaks at its own last step
  EXPECT_NEAR(s->Value(5), 0.5 * (1 + std::cos(kPi / 10)), 1e-15);  // decay(1)
  EXPECT_NEAR(s->Value(14), 0.0, 1e-15);
}

TEST(ScheduleTest, JoinedThreePieces) {
  SchedulePtr s = Ok(JoinedSchedule(
      {ConstantSchedule(1.0), Ok(LinearWarmupSchedule(0.0, 10.0, 10)),
       ConstantSchedule(-3.0)},
      {2, 5}));
  EXPECT_EQ(s->Value(1), 1.0);
  EXPECT_EQ(s->Value(2), 1.0);
  EXPECT_DOUBLE_EQ(s->Value(3), 1.0);  // warm-up at its t = 1
  EXPECT_DOUBLE_EQ(s->Value(5), 3.0);  // warm-up at its t = 3
  EXPECT_EQ(s->Value(6), -3.0);
  EXPECT_EQ(s->Value(1000), -3.0);
  // Nested joins compose.
  SchedulePtr nested = Ok(JoinedSchedule({s, ConstantSchedule(9.0)}, {6}));
  EXPECT_DOUBLE_EQ(nested->Value(5), 3.0);
  EXPECT_EQ(nested->Value(6), -3.0);
  EXPECT_EQ(nested->Value(7), 9.0);
}

TEST(ScheduleValidationTest, Piecewise) {
  ExpectInvalid(PiecewiseConstantSchedule({1, 2}, {1.0, 2.0}), "values");
  ExpectInvalid(PiecewiseConstantSchedule({}, {}), "values");
  ExpectInvalid(PiecewiseConstantSchedule({3, 3}, {1, 2, 3}), "boundaries");
  ExpectInvalid(PiecewiseConstantSchedule({5, 2}, {1, 2, 3}), "boundaries");
  ExpectInvalid(PiecewiseConstantSchedule({1}, {1.0, kNan}), "values[1]");
  ExpectInvalid(PiecewiseConstantSchedule({1}, {kInf, 1.0}), "values[0]");
}

TEST(ScheduleValidationTest, LinearWarmup) {
  ExpectInvalid(LinearWarmupSchedule(0, 1, 0), "steps");
  ExpectInvalid(LinearWarmupSchedule(0, 1, -3), "steps");
  ExpectInvalid(LinearWarmupSchedule(kNan, 1, 3), "start");
  ExpectInvalid(LinearWarmupSchedule(0, kInf, 3), "end");
}

TEST(ScheduleValidationTest, CosineDecay) {
  ExpectInvalid(CosineDecaySchedule(1, 0, 0), "steps");
  ExpectInvalid(CosineDecaySchedule(kInf, 5, 0), "init");
  ExpectInvalid(CosineDecaySchedule(1, 5, kNan), "alpha");
}

TEST(ScheduleValidationTest, ExponentialDecay) {
  ExpectInvalid(ExponentialDecaySchedule(1, 0.5, 0, false), "steps");
  ExpectInvalid(ExponentialDecaySchedule(1, -0.5, 3, false), "rate");
  ExpectInvalid(ExponentialDecaySchedule(1, 0.0, 3, true), "rate");
  ExpectInvalid(ExponentialDecaySchedule(kNan, 0.5, 3, true), "init");
}

TEST(ScheduleValidationTest, PolynomialDecay) {
  ExpectInvalid(PolynomialDecaySchedule(1, 0, 1, 0), "steps");
  ExpectInvalid(PolynomialDecaySchedule(1, 0, -1, 5), "power");
  ExpectInvalid(PolynomialDecaySchedule(1, kNan, 1, 5), "end");
  ExpectInvalid(PolynomialDecaySchedule(kInf, 0, 1, 5), "init");
}

TEST(ScheduleValidationTest, IncreasingRate) {
  ExpectInvalid(IncreasingRateSchedule(1, 0), "beta");
  ExpectInvalid(IncreasingRateSchedule(1, -1), "beta");
  ExpectInvalid(IncreasingRateSchedule(kNan, 1), "alpha");
}

TEST(ScheduleValidationTest, LogLinearWarmup) {
  ExpectInvalid(LogLinearWarmupSchedule(0, 1e-1, 5), "start");
  ExpectInvalid(LogLinearWarmupSchedule(-1e-4, 1e-1, 5), "start");
  ExpectInvalid(LogLinearWarmupSchedule(1e-4, 0, 5), "end");
  ExpectInvalid(LogLinearWarmupSchedule(1e-4, kInf, 5), "end");
  ExpectInvalid(LogLinearWarmupSchedule(1e-4, 1e-1, 0), "steps");
}

TEST(ScheduleValidationTest, Joined) {
  SchedulePtr c = ConstantSchedule(1.0);
  ExpectInvalid(JoinedSchedule({c, c}, {}), "schedules");
  ExpectInvalid(JoinedSchedule({c}, {3}), "schedules");
  ExpectInvalid(JoinedSchedule({c, nullptr}, {3}), "schedules[1]");
  ExpectInvalid(JoinedSchedule({c, c}, {0}), "boundaries");
  ExpectInvalid(JoinedSchedule({c, c, c}, {4, 4}), "boundaries");
  ExpectInvalid(JoinedSchedule({c, c, c}, {4, 2}), "boundaries");
  EXPECT_TRUE(JoinedSchedule({c}, {}).ok());
}

}  // namespace
}  // namespace natgrad::core
