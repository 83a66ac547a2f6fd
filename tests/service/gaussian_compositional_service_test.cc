// Compositional Gaussian steps and the ξ-space option through the service:
// the wire decode (shapes, dropped copies axis, omitted rest gradient) gives
// the core block's results in-process bit for bit; bad compositional input is
// INVALID_ARGUMENT naming block and field and changes nothing (the exported
// session is identical and the next good step is step 1); an exported
// session imported elsewhere continues bit-identically.
#include <functional>

#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/blocks/gaussian/math/gaussian_block.h"
#include "tests/service/server_fixture.h"

namespace natgrad::testing {
namespace {

using ::testing::HasSubstr;
using Form = core::GaussianCompositionalInput::FisherForm;

constexpr int kDim = 3, kSamples = 4;

struct Input {
  natgrad::v1::BlockStep wire;
  core::GaussianStepInput core;
};

Eigen::MatrixXd RowMajor(const std::vector<double>& v, int rows, int cols, int offset = 0) {
  Eigen::MatrixXd m(rows, cols);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) m(i, j) = v[offset + i * cols + j];
  return m;
}

// Mean + Cholesky parameters, samples, gradients and Fisher for `copies`
// copies; `drop_copies` sends [S, M]-style shapes (copies must be 1);
// `with_rest` sends grad1/grad2 (else they are omitted: zero).
Input MakeInput(std::mt19937& rng, int copies, Form form, bool drop_copies, bool with_rest) {
  Input in;
  std::normal_distribution<double> n;
  std::vector<double> p1, p2, g1, g2, eps, dl, fisher;
  in.core.gradient_space = core::GaussianStepInput::GradientSpace::kParametrization;
  core::GaussianCompositionalInput c;
  c.fisher_form = form;
  for (int k = 0; k < copies; ++k) {
    Eigen::VectorXd m(kDim);
    Eigen::MatrixXd l = Eigen::MatrixXd::Zero(kDim, kDim);
    for (int i = 0; i < kDim; ++i) {
      m(i) = n(rng);
      for (int j = 0; j <= i; ++j) l(i, j) = i == j ? 1.0 + 0.3 * std::abs(n(rng)) : 0.2 * n(rng);
    }
    Eigen::VectorXd r1(kDim);
    Eigen::MatrixXd r2 = Eigen::MatrixXd::Zero(kDim, kDim);
    for (int i = 0; i < kDim; ++i) {
      r1(i) = with_rest ? 0.1 * n(rng) : 0.0;
      for (int j = 0; j <= i; ++j) r2(i, j) = with_rest ? 0.1 * n(rng) : 0.0;
    }
    for (int i = 0; i < kDim; ++i) {
      p1.push_back(m(i));
      g1.push_back(r1(i));
      for (int j = 0; j < kDim; ++j) {
        p2.push_back(l(i, j));
        g2.push_back(r2(i, j));
      }
    }
    in.core.param1.push_back(m);
    in.core.param2.push_back(l);
    in.core.grad1.push_back(r1);
    in.core.grad2.push_back(r2);
    const int off = static_cast<int>(eps.size());
    for (int i = 0; i < kSamples * kDim; ++i) {
      eps.push_back(n(rng));
      dl.push_back(0.3 * n(rng));
    }
    c.samples.push_back(RowMajor(eps, kSamples, kDim, off));
    c.likelihood_gradients.push_back(RowMajor(dl, kSamples, kDim, off));
    const int foff = static_cast<int>(fisher.size());
    const auto spd = [&]() {
      Eigen::MatrixXd x(kDim, kDim);
      for (int i = 0; i < kDim * kDim; ++i) x.data()[i] = n(rng);
      Eigen::MatrixXd s = x * x.transpose() / kDim + 0.3 * Eigen::MatrixXd::Identity(kDim, kDim);
      return Eigen::MatrixXd(0.5 * (s + s.transpose()));
    };
    switch (form) {
      case Form::kFull: {
        Eigen::MatrixXd stacked(kSamples * kDim, kDim);
        for (int s = 0; s < kSamples; ++s) {
          const Eigen::MatrixXd f = spd();
          stacked.middleRows(s * kDim, kDim) = f;
          for (int i = 0; i < kDim; ++i)
            for (int j = 0; j < kDim; ++j) fisher.push_back(f(i, j));
        }
        c.likelihood_fisher.push_back(stacked);
        break;
      }
      case Form::kDiagonal:
        for (int i = 0; i < kSamples * kDim; ++i) fisher.push_back(0.2 + std::abs(n(rng)));
        c.likelihood_fisher.push_back(RowMajor(fisher, kSamples, kDim, foff));
        break;
      case Form::kShared: {
        const Eigen::MatrixXd f = spd();
        for (int i = 0; i < kDim; ++i)
          for (int j = 0; j < kDim; ++j) fisher.push_back(f(i, j));
        c.likelihood_fisher.push_back(f);
        break;
      }
    }
  }
  in.core.compositional = c;

  const auto shape = [&](std::vector<int64_t> rest) {
    if (!drop_copies) rest.insert(rest.begin(), copies);
    return rest;
  };
  in.wire.set_name("q_u");
  auto* g = in.wire.mutable_gaussian();
  *g->mutable_param1() = client::MakeTensor(p1, shape({kDim}));
  *g->mutable_param2() = client::MakeTensor(p2, shape({kDim, kDim}));
  if (with_rest) {
    *g->mutable_grad1() = client::MakeTensor(g1, shape({kDim}));
    *g->mutable_grad2() = client::MakeTensor(g2, shape({kDim, kDim}));
  }
  g->set_gradient_space(natgrad::v1::PARAMETRIZATION_GRADIENT);
  auto* w = g->mutable_compositional();
  *w->mutable_samples() = client::MakeTensor(eps, shape({kSamples, kDim}));
  *w->mutable_likelihood_gradients() = client::MakeTensor(dl, shape({kSamples, kDim}));
  switch (form) {
    case Form::kFull:
      *w->mutable_likelihood_fisher() = client::MakeTensor(fisher, shape({kSamples, kDim, kDim}));
      w->set_fisher_form(natgrad::v1::LIKELIHOOD_FISHER_FULL);
      break;
    case Form::kDiagonal:
      *w->mutable_likelihood_fisher() = client::MakeTensor(fisher, shape({kSamples, kDim}));
      w->set_fisher_form(natgrad::v1::LIKELIHOOD_FISHER_DIAGONAL);
      break;
    case Form::kShared:
      *w->mutable_likelihood_fisher() = client::MakeTensor(fisher, shape({kDim, kDim}));
      w->set_fisher_form(natgrad::v1::LIKELIHOOD_FISHER_SHARED);
      break;
  }
  return in;
}

natgrad::v1::SessionConfig Config(int copies, bool xi) {
  natgrad::v1::SessionConfig c;
  auto* q = c.add_blocks();
  q->set_name("q_u");
  auto* g = q->mutable_gaussian();
  g->set_dim(kDim);
  g->set_copies(copies);
  g->set_parametrization(natgrad::v1::MEAN_CHOLESKY);
  *g->mutable_gamma() = Constant(0.4);
  *g->mutable_likelihood_damping() = Constant(0.05);
  g->set_return_direction(true);
  if (xi) g->set_step_space(natgrad::v1::STEP_SPACE_XI);
  return c;
}

core::GaussianOptions Options(int copies, bool xi) {
  core::GaussianOptions o;
  o.dim = kDim;
  o.copies = copies;
  o.parametrization = core::GaussianParametrization::kMeanCholesky;
  o.gamma = core::ConstantSchedule(0.4);
  o.likelihood_damping = core::ConstantSchedule(0.05);
  o.return_direction = true;
  if (xi) o.step_space = core::GaussianStepSpace::kXi;
  return o;
}

std::vector<double> Flat(const std::vector<Eigen::VectorXd>& v) {
  std::vector<double> out;
  for (const auto& x : v) out.insert(out.end(), x.data(), x.data() + x.size());
  return out;
}
std::vector<double> Flat(const std::vector<Eigen::MatrixXd>& v) {
  std::vector<double> out;
  for (const auto& m : v)
    for (int i = 0; i < m.rows(); ++i)
      for (int j = 0; j < m.cols(); ++j) out.push_back(m(i, j));
  return out;
}

struct Variant {
  int copies;
  Form form;
  bool drop_copies, with_rest, xi;
};

TEST(GaussianCompositionalService, StepsEqualCoreInProcess) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  std::mt19937 rng(31);
  for (const Variant& v : {Variant{2, Form::kFull, false, true, false},
                           Variant{2, Form::kShared, false, false, false},
                           Variant{1, Form::kDiagonal, true, false, false},
                           Variant{1, Form::kFull, true, true, true},
                           Variant{2, Form::kDiagonal, false, true, true}}) {
    SCOPED_TRACE(::testing::Message() << "copies " << v.copies << " form " << static_cast<int>(v.form)
                                      << " drop " << v.drop_copies << " rest " << v.with_rest
                                      << " xi " << v.xi);
    auto session = client.CreateSession(Config(v.copies, v.xi));
    ASSERT_TRUE(session.ok()) << session.status();
    auto stream = client.OpenStream(session->name());
    auto ref = *core::NewGaussianBlock("q_u", Options(v.copies, v.xi), core::Precision::kFloat64);
    for (int t = 1; t <= 3; ++t) {
      Input in = MakeInput(rng, v.copies, v.form, v.drop_copies, v.with_rest);
      auto r = (*stream)->Step({in.wire});
      ASSERT_TRUE(r.ok()) << r.status();
      core::StepContext ctx;
      ctx.step = t;
      auto pending = ref->Propose(core::BlockStepInput(in.core), ctx);
      ASSERT_TRUE(pending.ok()) << pending.status();
      const auto out = (*pending)->Commit(1.0);
      const auto& want = std::get<core::GaussianStepOutput>(out.kind_output);
      const auto& got = r->updates(0).gaussian();
      EXPECT_EQ(client::TensorValues(got.param1()), Flat(want.param1));
      EXPECT_EQ(client::TensorValues(got.param2()), Flat(want.param2));
      EXPECT_EQ(client::TensorValues(got.direction1()), Flat(want.direction1));
      EXPECT_EQ(client::TensorValues(got.direction2()), Flat(want.direction2));
      EXPECT_EQ(got.gamma_used(), want.gamma_used);
      EXPECT_EQ(r->updates(0).hyperparameters().at("likelihood_damping"), 0.05);
      // Replies keep the shapes the client sent.
      EXPECT_EQ(got.param1().shape_size(), v.drop_copies ? 1 : 2);
    }
  }
}

struct Bad {
  const char* what;
  std::function<void(natgrad::v1::BlockStep&)> mutate;
  const char* message;
};

TEST(GaussianCompositionalService, BadInputChangesNothing) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(Config(2, false));
  ASSERT_TRUE(session.ok());
  std::mt19937 rng(32);
  const natgrad::v1::SessionSnapshot before = *client.ExportSession(session->name());
  const auto comp = [](natgrad::v1::BlockStep& s) {
    return s.mutable_gaussian()->mutable_compositional();
  };
  const std::vector<Bad> bad = {
      {"no fisher_form", [&](auto& s) { comp(s)->clear_fisher_form(); },
       "block \"q_u\": gaussian.compositional.fisher_form must be"},
      {"no samples", [&](auto& s) { comp(s)->clear_samples(); },
       "gaussian.compositional.samples is required"},
      {"samples of the wrong dim",
       [&](auto& s) {
         *comp(s)->mutable_samples() = client::MakeTensor(std::vector<double>(2 * kSamples * 2, 0.0),
                                                          {2, kSamples, 2});
       },
       "gaussian.compositional.samples has shape [2, 4, 2], want [2, S, 3]"},
      {"gradients of another S",
       [&](auto& s) {
         *comp(s)->mutable_likelihood_gradients() =
             client::MakeTensor(std::vector<double>(2 * 3 * kDim, 0.0), {2, 3, kDim});
       },
       "gaussian.compositional.likelihood_gradients has shape [2, 3, 3], want [2, 4, 3]"},
      {"a full Fisher sent as shared",
       [&](auto& s) { comp(s)->set_fisher_form(natgrad::v1::LIKELIHOOD_FISHER_SHARED); },
       "gaussian.compositional.likelihood_fisher has shape [2, 4, 3, 3], want [2, 3, 3]"},
      {"non-symmetric Fisher",
       [&](auto& s) {
         std::vector<double> f = client::TensorValues(comp(s)->likelihood_fisher());
         f[(1 * kSamples + 2) * kDim * kDim + 1] += 0.5;  // copy 1, sample 2, entry (0, 1)
         *comp(s)->mutable_likelihood_fisher() = client::MakeTensor(f, {2, kSamples, kDim, kDim});
       },
       "block \"q_u\": gaussian.compositional.likelihood_fisher[1][2] is not symmetric"},
      {"indefinite Fisher",
       [&](auto& s) {
         std::vector<double> f = client::TensorValues(comp(s)->likelihood_fisher());
         for (int i = 0; i < kDim * kDim; ++i) f[i] = (i % (kDim + 1) == 0) ? -1.0 : 0.0;
         *comp(s)->mutable_likelihood_fisher() = client::MakeTensor(f, {2, kSamples, kDim, kDim});
       },
       "gaussian.compositional.likelihood_fisher[0][0] + likelihood_damping I "
       "(likelihood_damping = 0.05) is not positive definite"},
      {"NaN gradient",
       [&](auto& s) {
         std::vector<double> g = client::TensorValues(comp(s)->likelihood_gradients());
         g[5] = std::nan("");
         *comp(s)->mutable_likelihood_gradients() = client::MakeTensor(g, {2, kSamples, kDim});
       },
       "likelihood_gradients"},
  };
  for (const Bad& b : bad) {
    Input in = MakeInput(rng, 2, Form::kFull, false, true);
    b.mutate(in.wire);
    auto stream = client.OpenStream(session->name());
    auto r = (*stream)->Step({in.wire});
    ASSERT_FALSE(r.ok()) << b.what;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << b.what;
    EXPECT_THAT(r.status().message(), HasSubstr(b.message)) << b.what;
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(
        *client.ExportSession(session->name()), before))
        << b.what;
  }
  // A diagonal block refuses compositional input.
  natgrad::v1::SessionConfig dc;
  auto* d = dc.add_blocks();
  d->set_name("q_u");
  d->mutable_gaussian_diag()->set_dim(kDim);
  d->mutable_gaussian_diag()->set_copies(2);
  auto diag = client.CreateSession(dc);
  ASSERT_TRUE(diag.ok());
  {
    Input in = MakeInput(rng, 2, Form::kDiagonal, false, true);
    auto stream = client.OpenStream(diag->name());
    auto r = (*stream)->Step({in.wire});
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("gaussian.compositional is taken by full gaussian"));
  }
  // The session still takes a good step 1.
  auto stream = client.OpenStream(session->name());
  Input good = MakeInput(rng, 2, Form::kFull, false, true);
  auto r = (*stream)->Step({good.wire});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->step(), 1);
}

TEST(GaussianCompositionalService, SnapshotRestoreContinuesExactly) {
  auto server = StartServer();
  client::Client client(ClientFor(*server));
  auto session = client.CreateSession(Config(2, false));
  ASSERT_TRUE(session.ok());
  std::mt19937 rng(33);
  auto stream = client.OpenStream(session->name());
  for (int t = 1; t <= 2; ++t) {
    ASSERT_TRUE((*stream)->Step({MakeInput(rng, 2, Form::kFull, false, true).wire}).ok());
  }
  auto snap = client.ExportSession(session->name());
  ASSERT_TRUE(snap.ok()) << snap.status();
  auto copy = client.ImportSession(*snap, "restored-gcomp");
  ASSERT_TRUE(copy.ok()) << copy.status();
  auto copy_stream = client.OpenStream(copy->name());
  for (int t = 3; t <= 4; ++t) {
    const Input in = MakeInput(rng, 2, Form::kShared, false, t == 3);
    auto a = (*stream)->Step({in.wire});
    auto b = (*copy_stream)->Step({in.wire});
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(a->step(), t);
    EXPECT_EQ(b->step(), t);
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(a->updates(0), b->updates(0)));
  }
  // And the two sessions' states agree.
  auto sa = client.ExportSession(session->name());
  auto sb = client.ExportSession(copy->name());
  ASSERT_TRUE(sa.ok() && sb.ok());
  ASSERT_EQ(sa->blocks_size(), sb->blocks_size());
  for (int i = 0; i < sa->blocks_size(); ++i) {
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(sa->blocks(i), sb->blocks(i)));
  }
}

}  // namespace
}  // namespace natgrad::testing
