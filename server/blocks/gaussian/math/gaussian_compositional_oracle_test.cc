// The compositional gradient space and the ξ-space step of the gaussian
// block against a dense oracle written from the definitions only (nothing
// shared with the block):
//
//   coordinates  λ = (ξ1, lower triangle of ξ2) of the block's parametrisation
//                ξ: for the symmetric S, η2, θ2 an off-diagonal λ_ij (i > j)
//                sets both X_ij and X_ji; for the Cholesky factor it sets L_ij
//                only. dim λ = M + M(M+1)/2.
//   Fisher       F_q(λ) = ∂²/∂λ'² KL(q_λ ‖ q_λ') at λ' = λ, by central finite
//                differences (Richardson-extrapolated) in long double.
//   Jacobian     J_s = ∂z_s/∂λ, z_s = m(λ) + chol(S(λ)) ε_s, the same way.
//   gradient     g = mean_s J_sᵀ (F_s + λ_z I)⁻¹ ∇_z ℓ_s + ∂R/∂λ, R the rest of
//                the objective: R = ⟨grad1, ξ1⟩ + ⟨grad2, ξ2⟩ (all M² entries,
//                the autodiff convention) for PARAMETRIZATION_GRADIENT, the same
//                with η for EXPECTATION_GRADIENT.
//   direction    d = F_q⁻¹ g: the block's documented direction (∂ξ/∂θ) ∂L/∂η
//                read in λ (its second part's lower triangle).
// The θ step's result must be θ − γ d_θ with d_θ the oracle in natural
// coordinates, and the ξ step's ξ − γ d.
#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "Eigen/Cholesky"
#include "Eigen/Core"
#include "Eigen/LU"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blocks/gaussian/math/gaussian_block.h"
#include "server/core/schedule.h"

namespace natgrad::core {
namespace {

using LD = long double;
using VecL = Eigen::Matrix<LD, Eigen::Dynamic, 1>;
using MatL = Eigen::Matrix<LD, Eigen::Dynamic, Eigen::Dynamic>;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using P = GaussianParametrization;
using Form = GaussianCompositionalInput::FisherForm;
using Space = GaussianStepInput::GradientSpace;
using ::testing::HasSubstr;

const P kAll[] = {P::kNatural, P::kExpectation, P::kMeanCovariance, P::kMeanCholesky};

bool Symmetric(P p) { return p != P::kMeanCholesky; }

// ---- the oracle ------------------------------------------------------------

struct Oracle {
  P p;
  int m;
  int n() const { return m + m * (m + 1) / 2; }

  // λ -> (ξ1, ξ2).
  std::pair<VecL, MatL> Unpack(const VecL& lam) const {
    VecL x1 = lam.head(m);
    MatL x2 = MatL::Zero(m, m);
    int k = m;
    for (int j = 0; j < m; ++j)
      for (int i = j; i < m; ++i) {
        x2(i, j) = lam(k);
        if (Symmetric(p)) x2(j, i) = lam(k);
        ++k;
      }
    return {x1, x2};
  }
  VecL Pack(const MatrixXd& x1, const MatrixXd& x2) const {
    VecL lam(n());
    for (int i = 0; i < m; ++i) lam(i) = x1(i);
    int k = m;
    for (int j = 0; j < m; ++j)
      for (int i = j; i < m; ++i) lam(k++) = x2(i, j);
    return lam;
  }
  // λ -> (m, S), textbook.
  std::pair<VecL, MatL> MeanCov(const VecL& lam) const {
    auto [x1, x2] = Unpack(lam);
    switch (p) {
      case P::kNatural: {
        const MatL s = (LD(-2) * x2).inverse();
        return {s * x1, s};
      }
      case P::kExpectation:
        return {x1, x2 - x1 * x1.transpose()};
      case P::kMeanCovariance:
        return {x1, x2};
      case P::kMeanCholesky:
        return {x1, x2 * x2.transpose()};
    }
    return {};
  }
  // KL(q_a ‖ q_b).
  LD Kl(const VecL& a, const VecL& b) const {
    auto [ma, sa] = MeanCov(a);
    auto [mb, sb] = MeanCov(b);
    const Eigen::PartialPivLU<MatL> lu(sb);
    const VecL dm = mb - ma;
    return LD(0.5) * ((lu.solve(sa)).trace() + dm.dot(lu.solve(dm)) - LD(m) +
                      std::log(sb.determinant()) - std::log(sa.determinant()));
  }
  VecL Z(const VecL& lam, const VecL& eps) const {
    auto [mu, s] = MeanCov(lam);
    const MatL l = s.llt().matrixL();
    return mu + l * eps;
  }
  // η of λ, for expectation gradients.
  std::pair<VecL, MatL> Eta(const VecL& lam) const {
    auto [mu, s] = MeanCov(lam);
    return {mu, s + mu * mu.transpose()};
  }

  static constexpr LD kH = 2e-4L;

  // Richardson-extrapolated central difference of a vector function.
  template <typename F>
  MatL Jacobian(const VecL& lam, const F& f) const {
    const int rows = f(lam).size();
    MatL j(rows, n());
    for (int k = 0; k < n(); ++k) {
      auto at = [&](LD t) {
        VecL x = lam;
        x(k) += t;
        return f(x);
      };
      j.col(k) = (LD(8) * (at(kH) - at(-kH)) - (at(2 * kH) - at(-2 * kH))) / (LD(12) * kH);
    }
    return j;
  }

  MatL Fisher(const VecL& lam) const {
    const auto d = [&](int a, int b, LD h) {
      auto f = [&](LD sa, LD sb) {
        VecL x = lam;
        x(a) += sa;
        x(b) += sb;
        return Kl(lam, x);
      };
      return (f(h, h) - f(h, -h) - f(-h, h) + f(-h, -h)) / (LD(4) * h * h);
    };
    MatL fq(n(), n());
    for (int a = 0; a < n(); ++a)
      for (int b = 0; b <= a; ++b) {
        fq(a, b) = fq(b, a) = (LD(4) * d(a, b, kH) - d(a, b, 2 * kH)) / LD(3);
      }
    return fq;
  }

  // ∂R/∂λ for R = ⟨g1, a(λ)⟩ + ⟨G2, B(λ)⟩ (linear in (a, B)).
  template <typename Map>
  VecL Gradient(const VecL& lam, const VectorXd& g1, const MatrixXd& g2, const Map& map) const {
    const VecL gl1 = g1.cast<LD>();
    const MatL gl2 = g2.cast<LD>();
    const auto r = [&](const VecL& x) {
      auto [a, b] = map(x);
      VecL out(1);
      out(0) = gl1.dot(a) + (gl2.array() * b.array()).sum();
      return out;
    };
    return Jacobian(lam, r).row(0).transpose();
  }
};

struct Case {
  P p;
  int m, samples;
  Form form;
  Space rest_space;
  double damping;
};

struct CopyData {
  MatrixXd eps, grad, fisher;  // as GaussianCompositionalInput
  std::vector<MatrixXd> f_each;  // F_s as dense matrices
};

MatrixXd Spd(int m, std::mt19937& rng, double lo) {
  std::normal_distribution<double> n;
  MatrixXd x(m, m);
  for (int i = 0; i < m * m; ++i) x.data()[i] = n(rng);
  MatrixXd s = x * x.transpose() / m + lo * MatrixXd::Identity(m, m);
  return 0.5 * (s + s.transpose());
}

CopyData RandomCopy(const Case& c, std::mt19937& rng) {
  std::normal_distribution<double> n;
  std::uniform_real_distribution<double> u(0.2, 2.0);
  CopyData d;
  d.eps.resize(c.samples, c.m);
  d.grad.resize(c.samples, c.m);
  for (int i = 0; i < d.eps.size(); ++i) {
    d.eps.data()[i] = n(rng);
    d.grad.data()[i] = 0.3 * n(rng);
  }
  switch (c.form) {
    case Form::kFull:
      d.fisher.resize(c.samples * c.m, c.m);
      for (int s = 0; s < c.samples; ++s) {
        d.f_each.push_back(Spd(c.m, rng, 0.3));
        d.fisher.middleRows(s * c.m, c.m) = d.f_each.back();
      }
      break;
    case Form::kDiagonal:
      d.fisher.resize(c.samples, c.m);
      for (int s = 0; s < c.samples; ++s) {
        for (int j = 0; j < c.m; ++j) d.fisher(s, j) = u(rng);
        d.f_each.push_back(MatrixXd(d.fisher.row(s).transpose().asDiagonal()));
      }
      break;
    case Form::kShared:
      d.fisher = Spd(c.m, rng, 0.3);
      d.f_each.assign(c.samples, d.fisher);
      break;
  }
  return d;
}

// (ξ1, ξ2) of N(mu, s) in p, textbook.
std::pair<VectorXd, MatrixXd> ParamsOf(P p, const VectorXd& mu, const MatrixXd& s) {
  switch (p) {
    case P::kNatural: {
      const MatrixXd prec = s.inverse();
      return {prec * mu, -0.5 * prec};
    }
    case P::kExpectation:
      return {mu, s + mu * mu.transpose()};
    case P::kMeanCovariance:
      return {mu, s};
    case P::kMeanCholesky:
      return {mu, MatrixXd(s.llt().matrixL())};
  }
  return {};
}

// The oracle direction in p's λ for one copy.
VecL OracleDirection(const Oracle& o, const VecL& lam, const CopyData* d, double damping,
                     const VectorXd& r1, const MatrixXd& r2, Space rest_space) {
  VecL g = VecL::Zero(o.n());
  if (d != nullptr) {
    const int ns = d->eps.rows();
    for (int s = 0; s < ns; ++s) {
      const VecL eps = d->eps.row(s).transpose().cast<LD>();
      const MatL js = o.Jacobian(lam, [&](const VecL& x) { return o.Z(x, eps); });
      const MatL a = d->f_each[s].cast<LD>() + LD(damping) * MatL::Identity(o.m, o.m);
      const VecL us = a.partialPivLu().solve(VecL(d->grad.row(s).transpose().cast<LD>()));
      g += js.transpose() * us / LD(ns);
    }
  }
  if (rest_space == Space::kParametrization) {
    g += o.Gradient(lam, r1, r2, [&](const VecL& x) { return o.Unpack(x); });
  } else {
    g += o.Gradient(lam, r1, r2, [&](const VecL& x) { return o.Eta(x); });
  }
  return o.Fisher(lam).partialPivLu().solve(g);
}

double MaxAbs(const VecL& v) { return static_cast<double>(v.cwiseAbs().maxCoeff()); }

// ---- the tests -------------------------------------------------------------

std::vector<Case> AllCases() {
  std::vector<Case> out;
  int k = 0;
  for (int m : {2, 3})
    for (int s : {1, 4})
      for (Form f : {Form::kFull, Form::kDiagonal, Form::kShared})
        for (P p : kAll) {
          out.push_back({p, m, s, f, k % 2 ? Space::kExpectation : Space::kParametrization,
                         (k / 2) % 2 ? 0.3 : 0.0});
          ++k;
        }
  return out;
}

TEST(GaussianCompositionalOracleTest, DirectionAndStepMatchDenseOracle) {
  std::mt19937 rng(20261201);
  constexpr int kCopies = 2;
  constexpr double kGamma = 0.3;
  for (const Case& c : AllCases()) {
    SCOPED_TRACE(::testing::Message()
                 << GaussianParametrizationName(c.p) << " M=" << c.m << " S=" << c.samples
                 << " form=" << static_cast<int>(c.form)
                 << " rest=" << (c.rest_space == Space::kExpectation ? "eta" : "param")
                 << " damping=" << c.damping);
    GaussianOptions opt;
    opt.dim = c.m;
    opt.copies = kCopies;
    opt.parametrization = c.p;
    opt.gamma = ConstantSchedule(kGamma);
    opt.return_direction = true;
    opt.likelihood_damping = ConstantSchedule(c.damping);
    auto block = NewGaussianBlock("q", opt);
    ASSERT_TRUE(block.ok()) << block.status();

    GaussianStepInput in;
    in.gradient_space = c.rest_space;
    GaussianCompositionalInput comp;
    comp.fisher_form = c.form;
    std::vector<CopyData> data;
    std::vector<std::pair<VectorXd, MatrixXd>> moments;
    std::normal_distribution<double> n;
    for (int i = 0; i < kCopies; ++i) {
      VectorXd mu(c.m);
      for (int j = 0; j < c.m; ++j) mu(j) = n(rng);
      const MatrixXd s = Spd(c.m, rng, 0.5);
      moments.push_back({mu, s});
      auto [x1, x2] = ParamsOf(c.p, mu, s);
      in.param1.push_back(x1);
      in.param2.push_back(x2);
      VectorXd r1(c.m);
      MatrixXd r2(c.m, c.m);
      for (int j = 0; j < c.m; ++j) r1(j) = 0.2 * n(rng);
      for (int j = 0; j < c.m * c.m; ++j) r2.data()[j] = 0.2 * n(rng);
      if (c.p == P::kMeanCholesky && c.rest_space == Space::kParametrization) {
        r2 = MatrixXd(r2.triangularView<Eigen::Lower>());
      }
      in.grad1.push_back(r1);
      in.grad2.push_back(r2);
      data.push_back(RandomCopy(c, rng));
      comp.samples.push_back(data.back().eps);
      comp.likelihood_gradients.push_back(data.back().grad);
      comp.likelihood_fisher.push_back(data.back().fisher);
    }
    in.compositional = comp;
    StepContext ctx;
    ctx.step = 1;
    auto pending = (*block)->Propose(in, ctx);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const BlockStepOutput out = (*pending)->Commit(1);
    const auto& g = std::get<GaussianStepOutput>(out.kind_output);
    EXPECT_EQ(out.hyperparameters.at("likelihood_damping"), c.damping);
    EXPECT_LE(g.halvings, 2);
    const double gamma_used = g.gamma_used;

    const Oracle o{c.p, c.m};
    const Oracle nat{P::kNatural, c.m};
    for (int i = 0; i < kCopies; ++i) {
      SCOPED_TRACE(i);
      const VecL lam = o.Pack(in.param1[i], in.param2[i]);
      const VecL want = OracleDirection(o, lam, &data[i], c.damping, in.grad1[i], in.grad2[i],
                                        c.rest_space);
      const VecL got = o.Pack(g.direction1[i], g.direction2[i]);
      const double scale = std::max(1.0, MaxAbs(want));
      EXPECT_LT(MaxAbs(got - want), 1e-8 * scale) << "oracle " << want.transpose()
                                                   << "\nblock  " << got.transpose();
      if (Symmetric(c.p)) {
        EXPECT_LT((g.direction2[i] - g.direction2[i].transpose()).cwiseAbs().maxCoeff(), 1e-12);
      } else {
        EXPECT_EQ(MatrixXd(g.direction2[i].triangularView<Eigen::StrictlyUpper>()).norm(), 0.0);
      }
      // The θ step: θ' = θ − γ d_θ, d_θ the oracle's direction in natural
      // coordinates for the same objective (R written as a function of θ).
      const auto [t1, t2] = ParamsOf(P::kNatural, moments[i].first, moments[i].second);
      const VecL lam_t = nat.Pack(t1, t2);
      // R as a function of θ: compose θ -> (m, S) -> ξ (or η).
      const auto xi_of_theta = [&](const VecL& x) {
        auto [mu, s] = nat.MeanCov(x);
        if (c.rest_space == Space::kExpectation) {
          return std::pair<VecL, MatL>{mu, s + mu * mu.transpose()};
        }
        switch (c.p) {
          case P::kNatural:
            return nat.Unpack(x);
          case P::kExpectation:
            return std::pair<VecL, MatL>{mu, s + mu * mu.transpose()};
          case P::kMeanCovariance:
            return std::pair<VecL, MatL>{mu, s};
          case P::kMeanCholesky:
            return std::pair<VecL, MatL>{mu, MatL(s.llt().matrixL())};
        }
        return std::pair<VecL, MatL>{};
      };
      VecL gt = nat.Gradient(lam_t, in.grad1[i], in.grad2[i], xi_of_theta);
      for (int s = 0; s < c.samples; ++s) {
        const VecL eps = data[i].eps.row(s).transpose().cast<LD>();
        const MatL js = nat.Jacobian(lam_t, [&](const VecL& x) { return nat.Z(x, eps); });
        const MatL a = data[i].f_each[s].cast<LD>() + LD(c.damping) * MatL::Identity(c.m, c.m);
        const VecL us = a.partialPivLu().solve(VecL(data[i].grad.row(s).transpose().cast<LD>()));
        gt += js.transpose() * us / LD(c.samples);
      }
      const VecL dt = nat.Fisher(lam_t).partialPivLu().solve(gt);
      const VecL theta_new = lam_t - LD(gamma_used) * dt;
      // The block's new parameters, mapped to θ the textbook way.
      const auto [mu2, s2] = o.MeanCov(o.Pack(g.param1[i], g.param2[i]));
      const auto [nt1, nt2] = ParamsOf(P::kNatural, mu2.cast<double>(), s2.cast<double>());
      const VecL got_t = nat.Pack(nt1, nt2);
      EXPECT_LT(MaxAbs(got_t - theta_new), 1e-8 * std::max(1.0, MaxAbs(theta_new)))
          << "oracle " << theta_new.transpose() << "\nblock  " << got_t.transpose();
    }
  }
}

// ξ-space steps: ξ' = ξ − γ d with the oracle's d, for each parametrisation,
// with and without a compositional part.
TEST(GaussianXiStepOracleTest, XiStepIsXiMinusGammaDirection) {
  std::mt19937 rng(77);
  std::normal_distribution<double> n;
  constexpr double kGamma = 0.4;
  for (P p : kAll) {
    for (bool comp : {false, true}) {
      SCOPED_TRACE(::testing::Message() << GaussianParametrizationName(p) << " comp=" << comp);
      const int m = 3;
      GaussianOptions opt;
      opt.dim = m;
      opt.copies = 1;
      opt.parametrization = p;
      opt.gamma = ConstantSchedule(kGamma);
      opt.step_space = GaussianStepSpace::kXi;
      auto block = NewGaussianBlock("q", opt);
      ASSERT_TRUE(block.ok());
      VectorXd mu(m);
      for (int j = 0; j < m; ++j) mu(j) = n(rng);
      const MatrixXd s = Spd(m, rng, 1.0);
      auto [x1, x2] = ParamsOf(p, mu, s);
      GaussianStepInput in;
      in.gradient_space = Space::kParametrization;
      in.param1 = {x1};
      in.param2 = {x2};
      VectorXd r1(m);
      MatrixXd r2(m, m);
      for (int j = 0; j < m; ++j) r1(j) = 0.1 * n(rng);
      for (int j = 0; j < m * m; ++j) r2.data()[j] = 0.1 * n(rng);
      in.grad1 = {r1};
      in.grad2 = {r2};
      const Case c{p, m, 2, Form::kShared, Space::kParametrization, 0.0};
      CopyData d = RandomCopy(c, rng);
      d.grad *= 0.1;
      if (comp) {
        GaussianCompositionalInput ci;
        ci.fisher_form = Form::kShared;
        ci.samples = {d.eps};
        ci.likelihood_gradients = {d.grad};
        ci.likelihood_fisher = {d.fisher};
        in.compositional = ci;
      }
      StepContext ctx;
      ctx.step = 1;
      auto pending = (*block)->Propose(in, ctx);
      ASSERT_TRUE(pending.ok()) << pending.status();
      const auto out = (*pending)->Commit(1);
      const auto& g = std::get<GaussianStepOutput>(out.kind_output);
      ASSERT_EQ(g.halvings, 0);
      const Oracle o{p, m};
      const VecL lam = o.Pack(x1, x2);
      const VecL dir = OracleDirection(o, lam, comp ? &d : nullptr, 0.0, r1, r2,
                                       Space::kParametrization);
      const VecL want = lam - LD(kGamma) * dir;
      const VecL got = o.Pack(g.param1[0], g.param2[0]);
      EXPECT_LT(MaxAbs(got - want), 1e-8 * std::max(1.0, MaxAbs(want)))
          << "oracle " << want.transpose() << "\nblock  " << got.transpose();
      if (Symmetric(p)) {
        EXPECT_EQ(g.param2[0], g.param2[0].transpose());
      } else {
        EXPECT_EQ(MatrixXd(g.param2[0].triangularView<Eigen::StrictlyUpper>()).norm(), 0.0);
      }
      EXPECT_EQ(g.delta1[0], g.param1[0] - x1);
      EXPECT_EQ(g.delta2[0], g.param2[0] - x2);
    }
  }
}

// A ξ step that leaves the cone is halved until ξ − γ' d is a Gaussian.
TEST(GaussianXiStepOracleTest, HalvesGammaWhenXiLeavesTheCone) {
  const int m = 2;
  for (P p : {P::kMeanCovariance, P::kMeanCholesky, P::kExpectation}) {
    SCOPED_TRACE(GaussianParametrizationName(p));
    GaussianOptions opt;
    opt.dim = m;
    opt.parametrization = p;
    opt.gamma = ConstantSchedule(1.0);
    opt.step_space = GaussianStepSpace::kXi;
    opt.return_direction = true;
    auto block = NewGaussianBlock("q", opt);
    ASSERT_TRUE(block.ok());
    const VectorXd mu = VectorXd::Zero(m);
    const MatrixXd s = MatrixXd::Identity(m, m);
    auto [x1, x2] = ParamsOf(p, mu, s);
    GaussianStepInput in;
    in.gradient_space = Space::kExpectation;
    in.param1 = {x1};
    in.param2 = {x2};
    in.grad1 = {VectorXd::Zero(m)};
    // dL/dη2 = 3 I: Ṡ = 2SGS = 6 I, S − Ṡ = −5 I; the Cholesky direction is
    // L̇ = 3 I, L − L̇ = −2 I. Both need γ' < 1/6 resp. 1/3.
    in.grad2 = {3.0 * MatrixXd::Identity(m, m)};
    StepContext ctx;
    ctx.step = 1;
    auto pending = (*block)->Propose(in, ctx);
    ASSERT_TRUE(pending.ok()) << pending.status();
    const auto out = (*pending)->Commit(1);
    const auto& g = std::get<GaussianStepOutput>(out.kind_output);
    EXPECT_GT(g.halvings, 0);
    EXPECT_EQ(g.gamma_used, std::ldexp(1.0, -g.halvings));
    EXPECT_LT((g.param2[0] - (x2 - g.gamma_used * g.direction2[0])).cwiseAbs().maxCoeff(), 1e-15);
    // and the previous γ' would not have been a Gaussian
    const MatrixXd prev = x2 - 2 * g.gamma_used * g.direction2[0];
    const MatrixXd sprev = p == P::kMeanCholesky ? MatrixXd(prev * prev.transpose()) : prev;
    const bool prev_ok = p == P::kMeanCholesky ? (prev.diagonal().array() > 0).all()
                                               : (sprev.llt().info() == Eigen::Success);
    EXPECT_FALSE(prev_ok);
  }
}

// Bad compositional input is refused with the field named, nothing changes.
TEST(GaussianCompositionalTest, RefusesBadInput) {
  const int m = 2;
  GaussianOptions opt;
  opt.dim = m;
  opt.copies = 1;
  opt.parametrization = P::kMeanCovariance;
  auto block = NewGaussianBlock("q_u", opt);
  ASSERT_TRUE(block.ok());
  GaussianStepInput base;
  base.param1 = {VectorXd::Zero(m)};
  base.param2 = {MatrixXd::Identity(m, m)};
  base.grad1 = {VectorXd::Zero(m)};
  base.grad2 = {MatrixXd::Zero(m, m)};
  GaussianCompositionalInput c;
  c.fisher_form = Form::kFull;
  c.samples = {MatrixXd::Ones(2, m)};
  c.likelihood_gradients = {MatrixXd::Ones(2, m)};
  c.likelihood_fisher = {MatrixXd(2 * m, m)};
  c.likelihood_fisher[0] << 1, 0, 0, 1, 2, 0.5, 0.5, 1;
  StepContext ctx;
  ctx.step = 1;
  const auto refuse = [&](GaussianCompositionalInput bad, const std::string& what) {
    GaussianStepInput in = base;
    in.compositional = std::move(bad);
    auto r = (*block)->Propose(in, ctx);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("block \"q_u\""));
    EXPECT_THAT(r.status().message(), HasSubstr(what));
    EXPECT_EQ((*block)->ExportState().scalars.at("steps"), 0);
  };
  {
    GaussianStepInput in = base;
    in.compositional = c;
    ASSERT_TRUE((*block)->Propose(in, ctx).ok());
  }
  GaussianCompositionalInput bad = c;
  bad.likelihood_fisher[0](3, 0) = 0.7;  // F_1 not symmetric
  refuse(bad, "gaussian.compositional.likelihood_fisher[0][1] is not symmetric");
  bad = c;
  bad.likelihood_fisher[0].middleRows(2, 2) << -1, 0, 0, 1;  // F_1 not PSD
  refuse(bad, "gaussian.compositional.likelihood_fisher[0][1] + likelihood_damping I");
  bad = c;
  bad.likelihood_gradients[0](1, 1) = std::nan("");
  refuse(bad, "gaussian.compositional.likelihood_gradients[0] has a non-finite entry");
  bad = c;
  bad.samples[0] = MatrixXd::Ones(3, m);
  refuse(bad, "gaussian.compositional.likelihood_gradients[0] is 2x2, want 3x2");
  bad = c;
  bad.fisher_form = Form::kShared;
  refuse(bad, "gaussian.compositional.likelihood_fisher[0] is 4x2, want 2x2");
  bad = c;
  bad.fisher_form = Form::kDiagonal;
  bad.likelihood_fisher = {MatrixXd::Zero(2, m)};  // zero Fisher, zero damping
  refuse(bad, "likelihood_fisher[0][0] + likelihood_damping I (likelihood_damping = 0) is not positive definite");
  bad.likelihood_fisher = {MatrixXd::Zero(2, m)};
  bad.samples.push_back(bad.samples[0]);
  refuse(bad, "gaussian.compositional.samples has 2 copies, want 1");

  // With damping the zero Fisher is accepted: u = ∇ℓ / λ.
  opt.likelihood_damping = ConstantSchedule(2.0);
  opt.parametrization = P::kMeanCovariance;
  opt.return_direction = true;
  auto damped = NewGaussianBlock("q_u", opt);
  GaussianStepInput in = base;
  GaussianCompositionalInput z = c;
  z.fisher_form = Form::kDiagonal;
  z.likelihood_fisher = {MatrixXd::Zero(2, m)};
  in.compositional = z;
  auto r = (*damped)->Propose(in, ctx);
  ASSERT_TRUE(r.ok()) << r.status();
  // S = I, ε rows all ones, ∇ℓ all ones: ū_m = ½·1, so ṁ = S ū_m.
  const auto out = (*r)->Commit(1);
  EXPECT_LT((std::get<GaussianStepOutput>(out.kind_output).direction1[0] -
             VectorXd::Constant(m, 0.5))
                .cwiseAbs()
                .maxCoeff(),
            1e-15);
}

}  // namespace
}  // namespace natgrad::core
