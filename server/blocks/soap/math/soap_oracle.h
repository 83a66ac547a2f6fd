// Test-only: an independent dense transcription of the reference SOAP step
// (github.com/nikhilvyas/SOAP soap.py, SOAP.step and update_preconditioner)
// in double, written in the reference's own order: exp_avg is rotated back
// to the original space and into the (possibly new) eigenbasis at every
// preconditioner update, the factors are lerped, the first eigenbases come
// from Eigen's dense SelfAdjointEigenSolver (flipped to descending), and the
// power-iteration refresh uses an explicit modified Gram-Schmidt QR
// (positive R diagonal, unlike Householder: the update does not depend on
// the eigenvectors' signs, so the two must agree anyway).
#ifndef NATGRAD_SERVER_BLOCKS_SOAP_MATH_SOAP_ORACLE_H_
#define NATGRAD_SERVER_BLOCKS_SOAP_MATH_SOAP_ORACLE_H_

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "Eigen/Core"
#include "Eigen/Eigenvalues"

namespace natgrad::core::testing {

struct SoapOracleOptions {
  double beta1 = 0.95, beta2 = 0.95, shampoo_beta = 0.95, eps = 1e-8;
  bool correct_bias = true;
  int64_t precondition_frequency = 10;
  bool left = true, right = true;  // which sides have a preconditioner
  bool eigh_refresh = false;       // refresh by eigh instead of power + QR
};

class SoapOracle {
 public:
  using M = Eigen::MatrixXd;

  SoapOracle(const SoapOracleOptions& o, int64_t rows, int64_t cols)
      : o_(o), exp_avg_(M::Zero(rows, cols)), exp_avg_sq_(M::Zero(rows, cols)) {
    if (o.left) gg_l_ = M::Zero(rows, rows);
    if (o.right) gg_r_ = M::Zero(cols, cols);
  }

  // The parameter after one reference step from p (returned as the delta).
  M Step(const M& grad, const M& p_in, double lr, double weight_decay) {
    if (!have_q_) {
      UpdatePreconditioner(grad);
      return M::Zero(grad.rows(), grad.cols());  // "first step is skipped"
    }
    const M grad_projected = Project(grad);
    ++step_;
    exp_avg_ = exp_avg_ * o_.beta1 + grad_projected * (1 - o_.beta1);
    exp_avg_sq_ = exp_avg_sq_ * o_.beta2 + grad_projected.cwiseProduct(grad_projected) * (1 - o_.beta2);
    const M denom = (exp_avg_sq_.array().sqrt() + o_.eps).matrix();
    double step_size = lr;
    if (o_.correct_bias) {
      const double bc1 = 1 - std::pow(o_.beta1, step_);
      const double bc2 = 1 - std::pow(o_.beta2, step_);
      step_size = step_size * std::pow(bc2, 0.5) / bc1;
    }
    const M norm_grad = ProjectBack(exp_avg_.cwiseQuotient(denom));
    M p = p_in;
    p += -step_size * norm_grad;
    if (weight_decay > 0) p += p * (-lr * weight_decay);
    UpdatePreconditioner(grad);
    return p - p_in;
  }

 private:
  M Project(M x) const {
    if (o_.left) x = q_l_.transpose() * x;
    if (o_.right) x = x * q_r_;
    return x;
  }
  M ProjectBack(M x) const {
    if (o_.left) x = q_l_ * x;
    if (o_.right) x = x * q_r_.transpose();
    return x;
  }

  static M Lerp(const M& a, const M& b, double w) { return a + w * (b - a); }

  static M EighDescending(const M& m) {
    Eigen::SelfAdjointEigenSolver<M> es(m);
    return es.eigenvectors().rowwise().reverse();
  }

  // Modified Gram-Schmidt, twice (reorthogonalised), R's diagonal positive.
  static M GramSchmidtQ(const M& a) {
    M q = a;
    for (int64_t j = 0; j < q.cols(); ++j) {
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t i = 0; i < j; ++i) q.col(j) -= q.col(i).dot(q.col(j)) * q.col(i);
      }
      q.col(j) /= q.col(j).norm();
    }
    return q;
  }

  // get_orthogonal_matrix_QR (or its eigh analogue): sort the old basis by
  // its estimated eigenvalues, permute exp_avg_sq alike, new basis.
  M Refresh(const M& gg, const M& q_old, int dim) {
    const Eigen::VectorXd est = (q_old.transpose() * gg * q_old).diagonal();
    std::vector<int64_t> sort_idx(est.size());
    std::iota(sort_idx.begin(), sort_idx.end(), 0);
    std::stable_sort(sort_idx.begin(), sort_idx.end(),
                     [&](int64_t a, int64_t b) { return est(a) > est(b); });
    M o(q_old.rows(), q_old.cols());
    M sq = exp_avg_sq_;
    for (size_t i = 0; i < sort_idx.size(); ++i) {
      o.col(i) = q_old.col(sort_idx[i]);
      if (dim == 0) sq.row(i) = exp_avg_sq_.row(sort_idx[i]);
      else sq.col(i) = exp_avg_sq_.col(sort_idx[i]);
    }
    exp_avg_sq_ = sq;
    if (o_.eigh_refresh) return EighDescending(gg);
    return GramSchmidtQ(gg * o);
  }

  void UpdatePreconditioner(const M& grad) {
    if (have_q_) exp_avg_ = ProjectBack(exp_avg_);
    if (o_.left) gg_l_ = Lerp(gg_l_, grad * grad.transpose(), 1 - o_.shampoo_beta);
    if (o_.right) gg_r_ = Lerp(gg_r_, grad.transpose() * grad, 1 - o_.shampoo_beta);
    if (!have_q_) {
      if (o_.left) q_l_ = EighDescending(gg_l_);
      if (o_.right) q_r_ = EighDescending(gg_r_);
      have_q_ = true;
    }
    if (step_ > 0 && step_ % o_.precondition_frequency == 0) {
      if (o_.left) q_l_ = Refresh(gg_l_, q_l_, 0);
      if (o_.right) q_r_ = Refresh(gg_r_, q_r_, 1);
    }
    if (step_ > 0) exp_avg_ = Project(exp_avg_);
  }

  SoapOracleOptions o_;
  int64_t step_ = 0;
  bool have_q_ = false;
  M exp_avg_, exp_avg_sq_, gg_l_, gg_r_, q_l_, q_r_;
};

}  // namespace natgrad::core::testing

#endif  // NATGRAD_SERVER_BLOCKS_SOAP_MATH_SOAP_ORACLE_H_
