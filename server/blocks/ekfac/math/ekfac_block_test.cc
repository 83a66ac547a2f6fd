// Tests of the EKFAC block against an independent dense oracle: explicit
// per-example gradient matrices (for a convolution the sum over its
// locations), dense eigendecompositions of the EMA factors, the scaling as
// E_i[(U_G^T G_i U_A)^2] one example at a time, and the update formula;
// plus K-FAC's eigen-exact update (kfac_dense's own block) as the case
// s = s_G s_A^T.
#include "server/blocks/ekfac/math/ekfac_block.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "Eigen/Eigenvalues"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blocks/ekfac/math/ekfac_kernels.h"
#include "server/blocks/kfac_dense/math/kfac_dense_block.h"
#include "server/engine/testing/eigen_inversion_engine.h"

namespace natgrad::core {
namespace {

using ::testing::HasSubstr;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using testing::EigenInversionEngine;

SchedulePtr C(double v) { return ConstantSchedule(v); }

MatrixXd RandomMatrix(int rows, int cols, std::mt19937& rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  MatrixXd m(rows, cols);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) m(i, j) = normal(rng);
  return m;
}

struct Config {
  int d_in = 4, d_out = 3;
  bool bias = true;
  int n = 9, locations = 1;
  double lr = 0.3, damping = 1e-2, momentum = 0.5, weight_decay = 0.01, decay = 0.8;
  int inverse_period = 3;
};

// One step's data: raw rows, and W for weight decay.
struct StepData {
  MatrixXd a, g;  // n*T x d_in, n*T x d_out
};

StepData RandomStep(const Config& c, std::mt19937& rng) {
  StepData d;
  d.a = RandomMatrix(c.n * c.locations, c.d_in, rng);
  d.g = RandomMatrix(c.n * c.locations, c.d_out, rng, 0.5);
  return d;
}

// The oracle, written from the paper's definitions without the block's
// kernels: every per-example gradient as a dense matrix.
class Oracle {
 public:
  explicit Oracle(const Config& c) : c_(c) {
    const int da = c.d_in + (c.bias ? 1 : 0);
    a_ema_ = MatrixXd::Zero(da, da);
    g_ema_ = MatrixXd::Zero(c.d_out, c.d_out);
    momentum_ = MatrixXd::Zero(c.d_out, da);
  }

  // Example i's gradient of its own loss: sum over its locations t of
  // g_{i,t} abar_{i,t}^T.
  std::vector<MatrixXd> PerExample(const StepData& d) const {
    std::vector<MatrixXd> out;
    for (int i = 0; i < c_.n; ++i) {
      MatrixXd gi = MatrixXd::Zero(c_.d_out, Abar(d.a.row(0)).size());
      for (int t = 0; t < c_.locations; ++t) {
        const int r = i * c_.locations + t;
        gi += d.g.row(r).transpose() * Abar(d.a.row(r)).transpose();
      }
      out.push_back(gi);
    }
    return out;
  }

  // The mean loss's gradient: the mean of the per-example ones.
  MatrixXd MeanGradient(const StepData& d) const {
    const auto per = PerExample(d);
    MatrixXd sum = MatrixXd::Zero(per[0].rows(), per[0].cols());
    for (const auto& p : per) sum += p;
    return sum / c_.n;
  }

  MatrixXd Step(int t, const StepData& d, const MatrixXd& w, bool flip_signs) {
    const int da = c_.d_in + (c_.bias ? 1 : 0);
    MatrixXd a_batch = MatrixXd::Zero(da, da), g_batch = MatrixXd::Zero(c_.d_out, c_.d_out);
    for (int r = 0; r < d.a.rows(); ++r) {
      const VectorXd ab = Abar(d.a.row(r));
      a_batch += ab * ab.transpose();
      g_batch += d.g.row(r).transpose() * d.g.row(r);
    }
    a_batch /= c_.n;
    g_batch /= c_.n * c_.locations;
    a_ema_ = c_.decay * a_ema_ + (1 - c_.decay) * a_batch;
    g_ema_ = c_.decay * g_ema_ + (1 - c_.decay) * g_batch;
    weight_ = c_.decay * weight_ + (1 - c_.decay);
    const bool refresh = (t - 1) % c_.inverse_period == 0;
    if (refresh) {
      Eigen::SelfAdjointEigenSolver<MatrixXd> ea(a_ema_ / weight_), eg(g_ema_ / weight_);
      ua_ = ea.eigenvectors();
      ug_ = eg.eigenvectors();
      if (flip_signs) {  // the estimator and update do not depend on signs
        ua_.col(0) *= -1;
        ug_.col(ug_.cols() - 1) *= -1;
      }
      s_ema_ = MatrixXd::Zero(c_.d_out, da);
      s_weight_ = 0;
    }
    MatrixXd s_batch = MatrixXd::Zero(c_.d_out, da);
    for (const MatrixXd& gi : PerExample(d)) {
      s_batch += (ug_.transpose() * gi * ua_).array().square().matrix();
    }
    s_batch /= c_.n;
    s_ema_ = c_.decay * s_ema_ + (1 - c_.decay) * s_batch;
    s_weight_ = c_.decay * s_weight_ + (1 - c_.decay);
    const MatrixXd s = s_ema_ / s_weight_;
    const MatrixXd grad = MeanGradient(d) + c_.weight_decay * w;
    MatrixXd rotated = ug_.transpose() * grad * ua_;
    rotated.array() /= s.array() + c_.damping;
    const MatrixXd v = ug_ * rotated * ua_.transpose();
    momentum_ = c_.momentum * momentum_ + v;
    return -c_.lr * momentum_;
  }

 private:
  VectorXd Abar(const Eigen::RowVectorXd& a) const {
    VectorXd v(a.size() + (c_.bias ? 1 : 0));
    v.head(a.size()) = a.transpose();
    if (c_.bias) v(a.size()) = 1;
    return v;
  }

  Config c_;
  MatrixXd a_ema_, g_ema_, ua_, ug_, s_ema_, momentum_;
  double weight_ = 0, s_weight_ = 0;
};

EkfacOptions OptionsOf(const Config& c) {
  EkfacOptions o;
  o.d_in = c.d_in;
  o.d_out = c.d_out;
  o.has_bias = c.bias;
  o.learning_rate = C(c.lr);
  o.damping = C(c.damping);
  o.momentum = C(c.momentum);
  o.weight_decay = C(c.weight_decay);
  o.ema_decay = c.decay;
  o.inverse_period = c.inverse_period;
  o.locations = c.locations;
  return o;
}

KfacStepInput InputOf(const StepData& d, const MatrixXd& grad, const MatrixXd& w,
                      int64_t locations = 0) {
  KfacStepInput in;
  in.gradient = grad;
  in.params = w;
  KfacStatisticsInput k;
  k.activations = d.a;
  k.output_gradients = d.g;
  k.num_examples = d.a.rows();
  k.locations = locations;
  in.kfac = k;
  return in;
}

double MaxAbs(const MatrixXd& m) { return m.cwiseAbs().maxCoeff(); }

// Runs the block and the oracle side by side for `steps` steps, the
// parameters moving by the oracle's delta; returns the largest error
// relative to the delta's size.
double MaxRelativeError(const Config& c, Precision precision, int steps, bool flip = false) {
  EigenInversionEngine engine;
  auto block = NewEkfacBlock("fc", OptionsOf(c), precision);
  EXPECT_TRUE(block.ok()) << block.status();
  Oracle oracle(c);
  std::mt19937 rng(7 + c.locations);
  const int da = c.d_in + (c.bias ? 1 : 0);
  MatrixXd w = RandomMatrix(c.d_out, da, rng);
  double worst = 0;
  for (int t = 1; t <= steps; ++t) {
    const StepData d = RandomStep(c, rng);
    const MatrixXd grad = oracle.MeanGradient(d);
    StepContext ctx;
    ctx.step = t;
    ctx.engine = &engine;
    auto p = (*block)->Propose(InputOf(d, grad, w), ctx);
    EXPECT_TRUE(p.ok()) << p.status();
    if (!p.ok()) return INFINITY;
    const MatrixXd got = (*p)->Commit(1.0).delta.ToMatrix<double>();
    const MatrixXd want = oracle.Step(t, d, w, flip);
    worst = std::max(worst, MaxAbs(got - want) / MaxAbs(want));
    w += want;
  }
  return worst;
}

// A session proposes the blocks that will not wait for the engine side by
// side on pool threads: MayWaitForEngine must be true exactly on the steps
// whose Propose submits the eigenbases (the first and every 3rd here).
TEST(EkfacBlock, MayWaitForEngineExactlyOnBasisSteps) {
  Config c;
  EigenInversionEngine engine;
  auto block = NewEkfacBlock("fc", OptionsOf(c), Precision::kFloat64);
  ASSERT_TRUE(block.ok()) << block.status();
  std::mt19937 rng(3);
  const MatrixXd w = RandomMatrix(c.d_out, c.d_in + 1, rng);
  int waits = 0;
  for (int t = 1; t <= 8; ++t) {
    const StepData d = RandomStep(c, rng);
    StepContext ctx;
    ctx.step = t;
    ctx.engine = &engine;
    const bool may = (*block)->MayWaitForEngine(t);
    const int before = engine.submitted();
    auto p = (*block)->Propose(InputOf(d, RandomMatrix(c.d_out, c.d_in + 1, rng), w), ctx);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(may, engine.submitted() > before) << "step " << t;
    waits += may;
    (*p)->Commit(1.0);
  }
  EXPECT_EQ(waits, 3);  // steps 1, 4, 7
}

TEST(EkfacBlock, DenseLayerEqualsOracleFloat64) {
  Config c;
  EXPECT_LT(MaxRelativeError(c, Precision::kFloat64, 8), 1e-10);
}

TEST(EkfacBlock, EigenvectorSignsDoNotMatter) {
  Config c;
  EXPECT_LT(MaxRelativeError(c, Precision::kFloat64, 5, /*flip=*/true), 1e-10);
}

TEST(EkfacBlock, DenseLayerWithoutBiasEqualsOracleFloat64) {
  Config c;
  c.bias = false;
  c.inverse_period = 2;
  EXPECT_LT(MaxRelativeError(c, Precision::kFloat64, 6), 1e-10);
}

TEST(EkfacBlock, ConvolutionLocationsEqualOracleFloat64) {
  Config c;
  c.locations = 3;
  c.n = 5;
  EXPECT_LT(MaxRelativeError(c, Precision::kFloat64, 8), 1e-10);
}

TEST(EkfacBlock, EveryStepRefreshEqualsOracleFloat64) {
  Config c;
  c.inverse_period = 1;
  c.locations = 2;
  EXPECT_LT(MaxRelativeError(c, Precision::kFloat64, 4), 1e-10);
}

TEST(EkfacBlock, DenseLayerEqualsOracleFloat32) {
  Config c;
  EXPECT_LT(MaxRelativeError(c, Precision::kFloat32, 8), 1e-5);
}

TEST(EkfacBlock, ConvolutionEqualsOracleFloat32) {
  Config c;
  c.locations = 3;
  c.n = 5;
  EXPECT_LT(MaxRelativeError(c, Precision::kFloat32, 8), 1e-5);
}

// The estimator's two code paths agree: T = 1 through the product of
// squares, T > 1 per example; a T-location layer whose other locations are
// zero is the dense layer.
TEST(EkfacKernels, ScalingEstimatePathsAgree) {
  std::mt19937 rng(3);
  const MatrixXd ga = RandomMatrix(6, 3, rng), aa = RandomMatrix(6, 4, rng);
  MatrixXd ga3 = MatrixXd::Zero(18, 3), aa3 = MatrixXd::Zero(18, 4);
  for (int i = 0; i < 6; ++i) {
    ga3.row(3 * i + 1) = ga.row(i);
    aa3.row(3 * i + 1) = aa.row(i);
  }
  const MatrixXd dense = ekfac::ScalingEstimate<double>(ga, aa, 1);
  const MatrixXd conv = ekfac::ScalingEstimate<double>(ga3, aa3, 3);
  EXPECT_LT(MaxAbs(dense - conv), 1e-14 * MaxAbs(dense));
}

// With the scaling replaced by the Kronecker product of the factors'
// eigenvalues, EKFAC's update is K-FAC's (eigen-exact damping): checked
// against kfac_dense's block on the same statistics, whose factors the ekfac
// block must also hold identically.
TEST(EkfacBlock, EigenvalueProductScalingIsKfacDenseUpdate) {
  for (int locations : {1, 2}) {
    Config c;
    c.locations = locations;
    c.momentum = 0;  // compare the preconditioned direction itself
    EigenInversionEngine engine;
    auto ek = NewEkfacBlock("fc", OptionsOf(c), Precision::kFloat64);
    KfacDenseOptions ko;
    ko.d_in = c.d_in;
    ko.d_out = c.d_out;
    ko.has_bias = c.bias;
    ko.learning_rate = C(c.lr);
    ko.damping = C(c.damping);
    ko.weight_decay = C(c.weight_decay);
    ko.ema_decay = c.decay;
    ko.inverse_period = c.inverse_period;
    ko.locations = c.locations;
    ko.damping_mode = KfacDampingMode::kEigenExact;
    auto kf = NewKfacDenseBlock("fc", ko, Precision::kFloat64);
    ASSERT_TRUE(ek.ok() && kf.ok());
    std::mt19937 rng(11);
    Oracle oracle(c);
    const int da = c.d_in + (c.bias ? 1 : 0);
    const MatrixXd w = RandomMatrix(c.d_out, da, rng);
    for (int t = 1; t <= 5; ++t) {
      const StepData d = RandomStep(c, rng);
      const MatrixXd grad = oracle.MeanGradient(d);
      StepContext ctx;
      ctx.step = t;
      ctx.engine = &engine;
      auto pe = (*ek)->Propose(InputOf(d, grad, w), ctx);
      auto pk = (*kf)->Propose(InputOf(d, grad, w), ctx);
      ASSERT_TRUE(pe.ok() && pk.ok());
      (*pe)->Commit(1.0);
      const MatrixXd kfac_delta = (*pk)->Commit(1.0).delta.ToMatrix<double>();
      const BlockState es = (*ek)->ExportState(), ks = (*kf)->ExportState();
      EXPECT_LT(MaxAbs(es.tensors.at("a_ema") - ks.tensors.at("a_ema")), 1e-14);
      EXPECT_LT(MaxAbs(es.tensors.at("g_ema") - ks.tensors.at("g_ema")), 1e-14);
      const VectorXd sa = ks.tensors.at("a_eigenvalues").col(0);
      const VectorXd sg = ks.tensors.at("g_eigenvalues").col(0);
      const MatrixXd product = sg * sa.transpose();
      const MatrixXd v = ekfac::PreconditionScaled<double>(
          es.tensors.at("g_eigenvectors"), es.tensors.at("a_eigenvectors"), product,
          grad + c.weight_decay * w, c.damping);
      const MatrixXd want = -c.lr * v;
      EXPECT_LT(MaxAbs(kfac_delta - want), 1e-10 * MaxAbs(want))
          << "step " << t << " locations " << locations;
    }
  }
}

// The whole state round-trips: a block restored from step 4's export
// continues exactly as the original (float32 state, widened losslessly).
TEST(EkfacBlock, ExportImportContinuesExactly) {
  Config c;
  c.locations = 2;
  EigenInversionEngine engine;
  auto a = NewEkfacBlock("fc", OptionsOf(c), Precision::kFloat32);
  auto b = NewEkfacBlock("fc", OptionsOf(c), Precision::kFloat32);
  ASSERT_TRUE(a.ok() && b.ok());
  std::mt19937 rng(5);
  Oracle oracle(c);
  const int da = c.d_in + (c.bias ? 1 : 0);
  const MatrixXd w = RandomMatrix(c.d_out, da, rng);
  std::vector<StepData> data;
  for (int t = 1; t <= 8; ++t) data.push_back(RandomStep(c, rng));
  auto run = [&](ParameterBlock& blk, int t) {
    StepContext ctx;
    ctx.step = t;
    ctx.engine = &engine;
    auto p = blk.Propose(InputOf(data[t - 1], oracle.MeanGradient(data[t - 1]), w), ctx);
    EXPECT_TRUE(p.ok()) << p.status();
    return (*p)->Commit(1.0).delta.ToMatrix<double>();
  };
  for (int t = 1; t <= 4; ++t) run(**a, t);
  const BlockState s = (*a)->ExportState();
  EXPECT_EQ(s.scalars.at("basis_step"), 4);
  EXPECT_EQ(s.scalars.at("scaling_updates"), 1);
  EXPECT_EQ(s.scalars.at("stats_updates"), 4);
  ASSERT_TRUE((*b)->ImportState(s).ok());
  EXPECT_EQ((*b)->StateBytes(), (*a)->StateBytes());
  EXPECT_EQ((*a)->StateBytes(),
            EkfacStateBytes(*NormalizeEkfacOptions("fc", OptionsOf(c)), Precision::kFloat32));
  for (int t = 5; t <= 8; ++t) {
    const MatrixXd x = run(**a, t), y = run(**b, t);
    EXPECT_EQ(x, y) << "step " << t;
  }
  // A state with a stray tensor or a bad scalar is refused, naming it.
  BlockState bad = s;
  bad.tensors["a_damped_inverse"] = MatrixXd::Zero(da, da);
  EXPECT_THAT((*b)->ImportState(bad).message(), HasSubstr("a_damped_inverse"));
  bad = s;
  bad.scalars["scaling_weight"] = 2;
  EXPECT_THAT((*b)->ImportState(bad).message(), HasSubstr("scaling_weight"));
  bad = s;
  bad.tensors["scaling_ema"](0, 0) = NAN;
  EXPECT_THAT((*b)->ImportState(bad).message(), HasSubstr("scaling_ema"));
}

class EkfacRefusals : public ::testing::Test {
 protected:
  void SetUp() override {
    block_ = *NewEkfacBlock("fc", OptionsOf(c_), Precision::kFloat64);
    std::mt19937 rng(1);
    d_ = RandomStep(c_, rng);
    grad_ = RandomMatrix(c_.d_out, c_.d_in + 1, rng);
    ctx_.step = 1;
    ctx_.engine = &engine_;
  }
  absl::Status Try(const KfacStepInput& in) {
    const BlockState before = block_->ExportState();
    auto p = block_->Propose(in, ctx_);
    // Propose never changes the block.
    const BlockState after = block_->ExportState();
    EXPECT_EQ(before.scalars, after.scalars);
    for (const auto& [k, m] : before.tensors) EXPECT_EQ(m, after.tensors.at(k)) << k;
    return p.status();
  }

  Config c_;
  EigenInversionEngine engine_;
  std::unique_ptr<ParameterBlock> block_;
  StepData d_;
  MatrixXd grad_;
  StepContext ctx_;
};

TEST_F(EkfacRefusals, ReducedStatisticsNeedRaw) {
  KfacStepInput in;
  in.gradient = grad_;
  KfacStatisticsInput k;
  k.form = KfacStatisticsInput::Form::kReduced;
  k.a_factor = MatrixXd::Identity(c_.d_in + 1, c_.d_in + 1);
  k.g_factor = MatrixXd::Identity(c_.d_out, c_.d_out);
  k.num_examples = 4;
  in.kfac = k;
  absl::Status s = Try(in);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("block \"fc\": kfac.reduced"));
  EXPECT_THAT(s.message(), HasSubstr("ekfac needs raw statistics"));
}

TEST_F(EkfacRefusals, MissingStatistics) {
  KfacStepInput in;
  in.gradient = grad_;
  EXPECT_THAT(Try(in).message(), HasSubstr("block \"fc\": kfac statistics are missing"));
}

TEST_F(EkfacRefusals, BadShapesAndValues) {
  KfacStepInput in = InputOf(d_, grad_, grad_);
  in.kfac->activations = MatrixXd::Zero(c_.n, c_.d_in + 1);
  EXPECT_THAT(Try(in).message(), HasSubstr("kfac.raw.activations has 5 columns, want 4"));
  in = InputOf(d_, grad_, grad_);
  in.kfac->output_gradients = MatrixXd::Zero(c_.n - 1, c_.d_out);
  EXPECT_THAT(Try(in).message(), HasSubstr("kfac.raw.output_gradients has 8 rows, want 9"));
  in = InputOf(d_, grad_, grad_, /*locations=*/2);
  EXPECT_THAT(Try(in).message(), HasSubstr("want a multiple of locations (2)"));
  in = InputOf(d_, MatrixXd::Zero(c_.d_out, c_.d_in), grad_);
  EXPECT_THAT(Try(in).message(), HasSubstr("gradient has shape [3, 4], want [3, 5]"));
  MatrixXd a = d_.a;
  a(2, 1) = NAN;
  in = InputOf(d_, grad_, grad_);
  in.kfac->activations = a;
  EXPECT_THAT(Try(in).message(), HasSubstr("kfac.raw.activations has a non-finite value"));
  MatrixXd g = grad_;
  g(0, 0) = INFINITY;
  in = InputOf(d_, g, grad_);
  EXPECT_THAT(Try(in).message(), HasSubstr("block \"fc\": gradient has a non-finite value"));
  in = InputOf(d_, grad_, grad_);
  EXPECT_THAT(block_->Propose(DenseStepInput{}, ctx_).status().message(),
              HasSubstr("not for a ekfac block"));
}

TEST(EkfacOptions, ValidationNamesBlockAndField) {
  EkfacOptions o;
  o.d_in = 3;
  o.d_out = 0;
  EXPECT_THAT(NewEkfacBlock("w", o, Precision::kFloat32).status().message(),
              HasSubstr("block \"w\": ekfac.d_out is 0"));
  o.d_out = 2;
  o.ema_decay = 1.5;
  EXPECT_THAT(NormalizeEkfacOptions("w", o).status().message(), HasSubstr("ekfac.ema_decay"));
  o.ema_decay = 0;
  o.inverse_period = -1;
  EXPECT_THAT(NormalizeEkfacOptions("w", o).status().message(), HasSubstr("ekfac.inverse_period"));
  o.inverse_period = 0;
  auto n = NormalizeEkfacOptions("w", o);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->inverse_period, kEkfacDefaultInversePeriod);
  EXPECT_EQ(n->ema_decay, kEkfacDefaultEmaDecay);
  EXPECT_EQ(n->learning_rate->Value(1), kEkfacDefaultLearningRate);
  EXPECT_EQ(n->damping->Value(1), kEkfacDefaultDamping);
}

}  // namespace
}  // namespace natgrad::core
