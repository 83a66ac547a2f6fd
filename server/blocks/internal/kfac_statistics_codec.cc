#include "server/blocks/internal/kfac_statistics_codec.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/wire/tensor_codec.h"

namespace natgrad::blocks::internal {

absl::StatusOr<core::KfacStepInput> DecodeKfacStepBase(natgrad::v1::BlockStep& step,
                                                       absl::string_view kind,
                                                       ReplyFormat* reply) {
  if (absl::Status s = RefuseParts(step, kind, true); !s.ok()) return s;
  absl::StatusOr<core::DenseStepInput> dense = DecodeDenseStep(step, reply);
  if (!dense.ok()) return dense.status();
  core::KfacStepInput in;
  static_cast<core::DenseStepInput&>(in) = *std::move(dense);
  return in;
}

double InitialKfacDamping(const natgrad::v1::Schedule& damping) {
  auto s = OptionalSchedule(damping, "");
  if (!s.ok() || *s == nullptr) return core::kKfacDefaultDamping;
  return (*s)->Value(1);
}

absl::Status PrefixedKindStatus(const absl::Status& s, const std::string& field,
                                absl::string_view kind) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(field, ".", kind, ": ", s.message()));
}

absl::StatusOr<core::DenseTensor> TakeRank2Statistic(bool present, natgrad::v1::Tensor* t,
                                                     const std::string& field, bool scan) {
  if (!present) return absl::InvalidArgumentError(field + " is required");
  if (t->shape_size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " must be a rank-2 tensor, got shape [", absl::StrJoin(t->shape(), ", "), "]"));
  }
  return scan ? wire::TakeTensor(t, field) : wire::TakeTensorUnscanned(t, field);
}

absl::StatusOr<core::KfacStatisticsInput> TakeRawKfacStatistics(
    const natgrad::v1::BlockStep& step, natgrad::v1::RawKfacStatistics& raw) {
  core::KfacStatisticsInput k;
  k.form = core::KfacStatisticsInput::Form::kRaw;
  // Not scanned here: the blocks' Grams find a non-finite value on their own
  // pass (kfac::CheckedRawGram), which saves a pass over the largest tensors
  // of a step (46 MB for the MNIST autoencoder); every other read scans.
  auto a = TakeRank2Statistic(raw.has_activations(), raw.mutable_activations(),
                              StepField(step, "kfac.raw.activations"), /*scan=*/false);
  if (!a.ok()) return a.status();
  auto g = TakeRank2Statistic(raw.has_output_gradients(), raw.mutable_output_gradients(),
                              StepField(step, "kfac.raw.output_gradients"), /*scan=*/false);
  if (!g.ok()) return g.status();
  k.activations = *std::move(a);
  k.output_gradients = *std::move(g);
  k.num_examples = k.activations.rows();
  k.locations = raw.locations();
  return k;
}

}  // namespace natgrad::blocks::internal
