// The C ABI of natgrad.h over natgrad::client::Client / SessionStream.
// Everything here is hidden except the NATGRAD_C_API functions; each of those
// catches every exception and turns failures into a natgrad_status plus the
// thread-local message.
#include "client/c/natgrad.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/cpp/natgrad_client.h"
#include "client/cpp/tensor.h"

namespace {

using natgrad::client::Client;
using natgrad::client::SessionStream;

thread_local std::string last_error;

natgrad_status Fail(natgrad_status code, std::string message) {
  last_error = std::move(message);
  return code;
}

natgrad_status Invalid(std::string message) {
  return Fail(NATGRAD_INVALID_ARGUMENT, std::move(message));
}

natgrad_status FromStatus(const absl::Status& status) {
  if (status.ok()) {
    last_error.clear();
    return NATGRAD_OK;
  }
  // absl and gRPC share the numbering; natgrad_status copies it.
  return Fail(static_cast<natgrad_status>(status.code()), std::string(status.message()));
}

natgrad_status Ok() {
  last_error.clear();
  return NATGRAD_OK;
}

// Runs an API body with every exception mapped to a status: nothing may
// unwind into C (or Julia) frames.
template <typename F>
natgrad_status Guard(F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Fail(NATGRAD_RESOURCE_EXHAUSTED, "natgrad: out of memory");
  } catch (const std::exception& e) {
    return Fail(NATGRAD_INTERNAL, absl::StrCat("natgrad: internal error: ", e.what()));
  } catch (...) {
    return Fail(NATGRAD_INTERNAL, "natgrad: internal error (unknown exception)");
  }
}

// What the step path needs to know about a block: K-FAC statistics are sent
// with widths from the configuration, not from the caller.
struct BlockInfo {
  bool kfac = false;
  int64_t d_in = 0;
  int64_t d_out = 0;
};

std::map<std::string, BlockInfo> BlocksOf(const natgrad::v1::SessionConfig& config) {
  std::map<std::string, BlockInfo> out;
  for (const auto& b : config.blocks()) {
    BlockInfo info;
    if (b.has_kfac_dense()) {
      info.kfac = true;
      info.d_in = b.kfac_dense().d_in();
      info.d_out = b.kfac_dense().d_out();
    } else if (b.has_ekfac()) {
      info.kfac = true;
      info.d_in = b.ekfac().d_in();
      info.d_out = b.ekfac().d_out();
    }
    out[b.name()] = info;
  }
  return out;
}

}  // namespace

struct natgrad_client {
  std::shared_ptr<Client> client;
};

struct natgrad_session {
  // Declared before `stream`, destroyed after it: the stream holds a raw
  // Client* and must not outlive it.
  std::shared_ptr<Client> client;
  std::string name;
  std::map<std::string, BlockInfo> blocks;
  std::vector<std::string> block_names;  // configuration order
  std::mutex mu;  // serialises steps, delete
  std::unique_ptr<SessionStream> stream;
};

namespace {

natgrad_session* NewSession(const std::shared_ptr<Client>& client,
                            const natgrad::v1::Session& s) {
  auto* session = new natgrad_session;
  session->client = client;
  session->name = s.name();
  session->blocks = BlocksOf(s.config());
  for (const auto& b : s.config().blocks()) session->block_names.push_back(b.name());
  session->stream = std::make_unique<SessionStream>(client.get(), s.name(), s.last_step() + 1,
                                                    s.durable_step());
  return session;
}

constexpr int32_t kMaxDims = 32;
constexpr int64_t kMaxElements = int64_t{1} << 40;

// Shapes of n blocks laid out one after another in `dims`.
natgrad_status ReadShapes(size_t n, const int32_t* ndims, const int64_t* dims,
                          const char* const* names,
                          std::vector<std::vector<int64_t>>* shapes) {
  if (n > 0 && (ndims == nullptr || dims == nullptr)) {
    return Invalid("natgrad: ndims and dims must not be NULL");
  }
  size_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    const char* name = names[i];
    if (ndims[i] < 0 || ndims[i] > kMaxDims) {
      return Invalid(absl::StrCat("natgrad: block \"", name, "\": ndims must be 0..", kMaxDims,
                                  ", got ", ndims[i]));
    }
    std::vector<int64_t> shape(dims + offset, dims + offset + ndims[i]);
    offset += static_cast<size_t>(ndims[i]);
    int64_t count = 1;
    for (int64_t d : shape) {
      if (d < 0 || (d > 0 && count > kMaxElements / d)) {
        return Invalid(absl::StrCat("natgrad: block \"", name, "\": bad shape [",
                                    absl::StrJoin(shape, ", "), "]"));
      }
      count *= d;
    }
    shapes->push_back(std::move(shape));
  }
  return NATGRAD_OK;
}

int64_t Count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

natgrad::v1::Schedule Constant(double v) {
  natgrad::v1::Schedule s;
  s.mutable_constant()->set_value(v);
  return s;
}

bool IsBool(double v) { return v == 0.0 || v == 1.0; }

// Applies one hyperparameter to one block. Returns false when the block's
// kind has no such key; `*error` is set for a bad value.
bool ApplyHparam(natgrad::v1::BlockConfig* b, const std::string& key, double v,
                 std::string* error) {
  auto need_bool = [&]() {
    if (!IsBool(v)) *error = absl::StrCat("hyperparameter ", key, " must be 0 or 1, got ", v);
  };
  if (b->has_sgd()) {
    auto* c = b->mutable_sgd();
    if (key == "learning_rate") *c->mutable_learning_rate() = Constant(v);
    else if (key == "momentum") *c->mutable_momentum() = Constant(v);
    else if (key == "weight_decay") *c->mutable_weight_decay() = Constant(v);
    else if (key == "nesterov") {
      need_bool();
      c->set_nesterov(v != 0);
    } else {
      return false;
    }
    return true;
  }
  if (b->has_adam()) {
    auto* c = b->mutable_adam();
    if (key == "learning_rate") *c->mutable_learning_rate() = Constant(v);
    else if (key == "weight_decay") *c->mutable_weight_decay() = Constant(v);
    else if (key == "beta1") c->set_beta1(v);
    else if (key == "beta2") c->set_beta2(v);
    else if (key == "epsilon") c->set_epsilon(v);
    else if (key == "decoupled_weight_decay") {
      need_bool();
      c->set_decoupled_weight_decay(v != 0);
    } else {
      return false;
    }
    return true;
  }
  auto need_count = [&]() {
    if (v != std::floor(v) || v < 1 || v > 1e9) {
      *error = absl::StrCat("hyperparameter ", key, " must be a whole number >= 1, got ", v);
    }
    return static_cast<int64_t>(std::clamp(v, 0.0, 1e9));
  };
  if (b->has_shampoo()) {
    auto* c = b->mutable_shampoo();
    if (key == "learning_rate") *c->mutable_learning_rate() = Constant(v);
    else if (key == "weight_decay") *c->mutable_weight_decay() = Constant(v);
    else if (key == "beta1") c->set_beta1(v);
    else if (key == "beta2") c->set_beta2(v);
    else if (key == "epsilon") c->set_epsilon(v);
    else if (key == "bias_correction") {
      need_bool();
      c->set_bias_correction(v != 0);
    } else if (key == "precondition_frequency") c->set_precondition_frequency(need_count());
    else if (key == "start_preconditioning_step") c->set_start_preconditioning_step(need_count());
    else if (key == "max_preconditioner_dim") c->set_max_preconditioner_dim(need_count());
    else return false;
    return true;
  }
  if (b->has_soap()) {
    auto* c = b->mutable_soap();
    if (key == "learning_rate") *c->mutable_learning_rate() = Constant(v);
    else if (key == "weight_decay") *c->mutable_weight_decay() = Constant(v);
    else if (key == "beta1") c->set_beta1(v);
    else if (key == "beta2") c->set_beta2(v);
    else if (key == "shampoo_beta") c->set_shampoo_beta(v);
    else if (key == "epsilon") c->set_epsilon(v);
    else if (key == "bias_correction") {
      need_bool();
      c->set_bias_correction(v != 0);
    } else if (key == "eigh_refresh") {
      need_bool();
      c->set_refresh(v != 0 ? natgrad::v1::SOAP_REFRESH_EIGH : natgrad::v1::SOAP_REFRESH_POWER_QR);
    } else if (key == "precondition_frequency") c->set_precondition_frequency(need_count());
    else if (key == "max_precond_dim") c->set_max_precond_dim(need_count());
    else return false;
    return true;
  }
  // The keys kfac_dense and ekfac share (their configs use the same fields).
  auto kfac_layer_key = [&](auto* c) {
    if (key == "learning_rate") *c->mutable_learning_rate() = Constant(v);
    else if (key == "damping") *c->mutable_damping() = Constant(v);
    else if (key == "momentum") *c->mutable_momentum() = Constant(v);
    else if (key == "weight_decay") *c->mutable_weight_decay() = Constant(v);
    else if (key == "ema_decay") c->set_ema_decay(v);
    else if (key == "has_bias") {
      need_bool();
      // d_in follows the bias: the shape is [d_out, d_in + has_bias].
      c->set_has_bias(v != 0);
      c->set_d_in(b->shape(1) - (v != 0 ? 1 : 0));
    } else if (key == "inverse_period") {
      if (v != std::floor(v) || v < 0 || v > 1e9) {
        *error = absl::StrCat("hyperparameter inverse_period must be a whole number, got ", v);
      }
      c->set_inverse_period(static_cast<int64_t>(v));
    } else {
      return false;
    }
    return true;
  };
  if (b->has_kfac_dense()) {
    auto* c = b->mutable_kfac_dense();
    if (kfac_layer_key(c)) return true;
    if (key != "eigen_exact") return false;
    need_bool();
    c->set_damping_mode(v != 0 ? natgrad::v1::EIGEN_EXACT : natgrad::v1::FACTORED_TIKHONOV);
    return true;
  }
  if (b->has_ekfac()) return kfac_layer_key(b->mutable_ekfac());
  return false;
}

natgrad_status BuildSimpleConfig(size_t n_blocks, const char* const* names,
                                 const char* const* kinds, const int32_t* ndims,
                                 const int64_t* dims, size_t n_hparams,
                                 const char* const* keys, const double* values,
                                 natgrad::v1::SessionConfig* config) {
  if (n_blocks == 0) return Invalid("natgrad: at least one block is required");
  if (names == nullptr || kinds == nullptr) {
    return Invalid("natgrad: names and kinds must not be NULL");
  }
  for (size_t i = 0; i < n_blocks; ++i) {
    if (names[i] == nullptr || kinds[i] == nullptr) {
      return Invalid(absl::StrCat("natgrad: names[", i, "] and kinds[", i,
                                  "] must not be NULL"));
    }
  }
  std::vector<std::vector<int64_t>> shapes;
  if (natgrad_status s = ReadShapes(n_blocks, ndims, dims, names, &shapes); s != NATGRAD_OK) {
    return s;
  }
  std::map<std::string, natgrad::v1::BlockConfig*> by_name;
  for (size_t i = 0; i < n_blocks; ++i) {
    auto* b = config->add_blocks();
    b->set_name(names[i]);
    for (int64_t d : shapes[i]) b->add_shape(d);
    const std::string kind = kinds[i];
    if (kind == "sgd") {
      b->mutable_sgd();
    } else if (kind == "adam") {
      b->mutable_adam();
    } else if (kind == "shampoo") {
      b->mutable_shampoo();
    } else if (kind == "soap") {
      b->mutable_soap();
    } else if (kind == "kfac_dense") {
      if (shapes[i].size() != 2) {
        return Invalid(absl::StrCat("natgrad: kfac_dense block \"", names[i],
                                    "\" must be 2-D [d_out, d_in (+1)]"));
      }
      auto* k = b->mutable_kfac_dense();
      k->set_d_out(shapes[i][0]);
      k->set_d_in(shapes[i][1]);
    } else if (kind == "ekfac") {
      if (shapes[i].size() != 2) {
        return Invalid(absl::StrCat("natgrad: ekfac block \"", names[i],
                                    "\" must be 2-D [d_out, d_in (+1)]"));
      }
      auto* k = b->mutable_ekfac();
      k->set_d_out(shapes[i][0]);
      k->set_d_in(shapes[i][1]);
    } else {
      return Invalid(absl::StrCat("natgrad: block \"", names[i], "\": unknown kind \"", kind,
                                  "\" (sgd, adam, shampoo, soap, kfac_dense, ekfac)"));
    }
    by_name[names[i]] = b;
  }
  if (n_hparams > 0 && (keys == nullptr || values == nullptr)) {
    return Invalid("natgrad: hparam_keys and hparam_values must not be NULL");
  }
  // Plain keys first, so "<block>:<key>" overrides them whatever the order.
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < n_hparams; ++i) {
      if (keys[i] == nullptr) return Invalid(absl::StrCat("natgrad: hparam_keys[", i, "] is NULL"));
      const std::string full = keys[i];
      const double v = values[i];
      if (!std::isfinite(v)) {
        return Invalid(absl::StrCat("natgrad: hyperparameter ", full, " is not finite"));
      }
      // Block names may contain ':', keys never do.
      const size_t colon = full.rfind(':');
      const bool scoped = colon != std::string::npos;
      if (scoped != (pass == 1)) continue;
      std::string error;
      if (!scoped) {
        if (full == "state_float64") {
          if (!IsBool(v)) return Invalid("natgrad: state_float64 must be 0 or 1");
          config->set_state_dtype(v != 0 ? natgrad::v1::FLOAT64 : natgrad::v1::FLOAT32);
          continue;
        }
        if (full == "kl_clip") {
          if (v < 0) return Invalid("natgrad: kl_clip must be >= 0");
          config->mutable_kl_clip()->set_enabled(v > 0);
          config->mutable_kl_clip()->set_kappa(v);
          continue;
        }
        bool used = false;
        for (auto& b : *config->mutable_blocks()) used |= ApplyHparam(&b, full, v, &error);
        if (!error.empty()) return Invalid("natgrad: " + error);
        if (!used) {
          return Invalid(absl::StrCat("natgrad: hyperparameter \"", full,
                                      "\" applies to none of the blocks"));
        }
      } else {
        const std::string block = full.substr(0, colon), key = full.substr(colon + 1);
        auto it = by_name.find(block);
        if (it == by_name.end()) {
          return Invalid(absl::StrCat("natgrad: hyperparameter \"", full,
                                      "\": no block named \"", block, "\""));
        }
        if (!ApplyHparam(it->second, key, v, &error)) {
          return Invalid(absl::StrCat("natgrad: hyperparameter \"", full, "\": block \"", block,
                                      "\" has no ", key));
        }
        if (!error.empty()) return Invalid("natgrad: " + error);
      }
    }
  }
  return NATGRAD_OK;
}

natgrad_status CreateFromConfig(natgrad_client* client, const natgrad::v1::SessionConfig& config,
                                const char* session_id, natgrad_session** out) {
  auto session = client->client->CreateSession(config, session_id ? session_id : "");
  if (!session.ok()) return FromStatus(session.status());
  *out = NewSession(client->client, *session);
  return Ok();
}

template <typename T>
natgrad::v1::Tensor Tensor(const T* data, std::vector<int64_t> shape) {
  return natgrad::client::MakeTensor(data, std::move(shape));
}

// Delta values of `t` as T, checking the element count.
template <typename T>
bool DecodeDelta(const natgrad::v1::Tensor& t, int64_t count, std::vector<T>* out) {
  size_t es;
  if (t.dtype() == natgrad::v1::FLOAT64) es = 8;
  else if (t.dtype() == natgrad::v1::FLOAT32) es = 4;
  else return false;
  if (t.data().size() != static_cast<size_t>(count) * es) return false;
  out->resize(count);
  const char* p = t.data().data();
  for (int64_t i = 0; i < count; ++i) {
    if (es == 8) {
      double d;
      std::memcpy(&d, p + 8 * i, 8);
      (*out)[i] = static_cast<T>(d);
    } else {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      (*out)[i] = static_cast<T>(f);
    }
  }
  return true;
}

template <typename T>
natgrad_status Step(natgrad_session* session, size_t n, const char* const* names,
                    const int32_t* ndims, const int64_t* dims, const T* const* gradients,
                    const T* const* params, const int64_t* kfac_rows,
                    const T* const* activations, const T* const* output_gradients,
                    double loss, T* const* deltas) {
  if (session == nullptr) return Invalid("natgrad: session is NULL");
  if (n > 0 && (names == nullptr || gradients == nullptr || deltas == nullptr)) {
    return Invalid("natgrad: names, gradients and deltas must not be NULL");
  }
  for (size_t i = 0; i < n; ++i) {
    if (names[i] == nullptr) return Invalid(absl::StrCat("natgrad: names[", i, "] is NULL"));
  }
  std::vector<std::vector<int64_t>> shapes;
  if (natgrad_status s = ReadShapes(n, ndims, dims, names, &shapes); s != NATGRAD_OK) return s;

  std::vector<natgrad::v1::BlockStep> blocks(n);
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < n; ++i) {
    const std::string name = names[i];
    const int64_t count = Count(shapes[i]);
    if (!index.emplace(name, i).second) {
      return Invalid(absl::StrCat("natgrad: block \"", name, "\" given twice"));
    }
    if (gradients[i] == nullptr || deltas[i] == nullptr) {
      return Invalid(absl::StrCat("natgrad: block \"", name,
                                  "\": gradient and delta buffers must not be NULL"));
    }
    auto& b = blocks[i];
    b.set_name(name);
    *b.mutable_gradient() = Tensor(gradients[i], shapes[i]);
    if (params != nullptr && params[i] != nullptr) {
      *b.mutable_params() = Tensor(params[i], shapes[i]);
    }
    const int64_t rows = kfac_rows == nullptr ? 0 : kfac_rows[i];
    if (rows < 0) return Invalid(absl::StrCat("natgrad: block \"", name, "\": kfac_rows < 0"));
    if (rows > 0) {
      auto it = session->blocks.find(name);
      if (it == session->blocks.end() || !it->second.kfac) {
        return Invalid(absl::StrCat("natgrad: block \"", name,
                                    "\": K-FAC statistics given for a block that is not "
                                    "kfac_dense or ekfac in session ", session->name));
      }
      if (activations == nullptr || output_gradients == nullptr ||
          activations[i] == nullptr || output_gradients[i] == nullptr) {
        return Invalid(absl::StrCat("natgrad: block \"", name,
                                    "\": kfac_rows > 0 needs activations and output_gradients"));
      }
      auto* raw = b.mutable_kfac()->mutable_raw();
      *raw->mutable_activations() = Tensor(activations[i], {rows, it->second.d_in});
      *raw->mutable_output_gradients() = Tensor(output_gradients[i], {rows, it->second.d_out});
    }
  }
  std::optional<double> loss_value;
  if (!std::isnan(loss)) loss_value = loss;

  std::lock_guard<std::mutex> lock(session->mu);
  auto response = session->stream->Step(std::move(blocks), loss_value);
  if (!response.ok()) return FromStatus(response.status());

  // Decode everything before writing anything: outputs only change on success.
  std::vector<std::vector<T>> decoded(n);
  std::vector<bool> seen(n, false);
  for (const auto& u : response->updates()) {
    auto it = index.find(u.name());
    if (it == index.end()) {
      return Fail(NATGRAD_INTERNAL,
                  absl::StrCat("natgrad: response has an update for unknown block \"", u.name(),
                               "\""));
    }
    const size_t i = it->second;
    if (!DecodeDelta(u.delta(), Count(shapes[i]), &decoded[i])) {
      return Fail(NATGRAD_INTERNAL, absl::StrCat("natgrad: block \"", u.name(),
                                                 "\": delta does not match the gradient's shape"));
    }
    seen[i] = true;
  }
  for (size_t i = 0; i < n; ++i) {
    if (!seen[i]) {
      return Fail(NATGRAD_INTERNAL,
                  absl::StrCat("natgrad: response has no update for block \"", names[i], "\""));
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (!decoded[i].empty()) {
      std::memcpy(deltas[i], decoded[i].data(), decoded[i].size() * sizeof(T));
    }
  }
  return Ok();
}

}  // namespace

extern "C" {

int32_t natgrad_abi_version(void) { return NATGRAD_C_ABI_VERSION; }

const char* natgrad_last_error(void) { return last_error.c_str(); }

const char* natgrad_status_name(int32_t status) {
  static const char* const kNames[] = {
      "OK",        "CANCELLED",         "UNKNOWN",       "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",     "UNAVAILABLE",   "DATA_LOSS",
      "UNAUTHENTICATED"};
  if (status < 0 || status > 16) return "UNKNOWN";
  return kNames[status];
}

void natgrad_client_options_init(natgrad_client_options* options) {
  if (options == nullptr) return;
  const natgrad::client::ClientOptions d;
  options->max_retries = d.max_retries;
  options->initial_backoff_ms = static_cast<int32_t>(absl::ToInt64Milliseconds(d.initial_backoff));
  options->max_message_bytes = d.max_message_bytes;
  options->max_blocks_per_message = d.max_blocks_per_message;
}

natgrad_status natgrad_client_new(const char* target, const char* bearer_token,
                                  natgrad_client** out) {
  return natgrad_client_new_with_options(target, bearer_token, nullptr, out);
}

natgrad_status natgrad_client_new_with_options(const char* target, const char* bearer_token,
                                               const natgrad_client_options* options,
                                               natgrad_client** out) {
  return Guard([&]() -> natgrad_status {
    if (out == nullptr) return Invalid("natgrad: out is NULL");
    if (target == nullptr || target[0] == '\0') return Invalid("natgrad: target is empty");
    natgrad::client::ClientOptions o;
    o.target = target;
    if (bearer_token != nullptr) o.bearer_token = bearer_token;
    if (options != nullptr) {
      if (options->max_retries < 0 || options->initial_backoff_ms < 0 ||
          options->max_blocks_per_message <= 0 || options->max_message_bytes <= 0 ||
          options->max_message_bytes > std::numeric_limits<int32_t>::max()) {
        return Invalid(
            "natgrad: options out of range (max_retries >= 0, initial_backoff_ms >= 0, "
            "max_blocks_per_message > 0, 0 < max_message_bytes < 2 GiB)");
      }
      o.max_retries = options->max_retries;
      o.initial_backoff = absl::Milliseconds(options->initial_backoff_ms);
      o.max_message_bytes = options->max_message_bytes;
      o.max_blocks_per_message = options->max_blocks_per_message;
    }
    auto client = std::make_unique<natgrad_client>();
    client->client = std::make_shared<Client>(std::move(o));
    *out = client.release();
    return Ok();
  });
}

void natgrad_client_free(natgrad_client* client) { delete client; }

natgrad_status natgrad_session_create(natgrad_client* client, const void* config,
                                      size_t config_size, const char* session_id,
                                      natgrad_session** out) {
  return Guard([&]() -> natgrad_status {
    if (client == nullptr || out == nullptr) return Invalid("natgrad: client or out is NULL");
    if (config == nullptr && config_size > 0) return Invalid("natgrad: config is NULL");
    if (config_size > static_cast<size_t>(std::numeric_limits<int>::max())) {
      return Invalid("natgrad: config too large");
    }
    natgrad::v1::SessionConfig parsed;
    if (config_size > 0 && !parsed.ParseFromArray(config, static_cast<int>(config_size))) {
      return Invalid("natgrad: config is not a serialized natgrad.v1.SessionConfig");
    }
    return CreateFromConfig(client, parsed, session_id, out);
  });
}

natgrad_status natgrad_session_create_simple(natgrad_client* client, size_t n_blocks,
                                             const char* const* names, const char* const* kinds,
                                             const int32_t* ndims, const int64_t* dims,
                                             size_t n_hparams, const char* const* hparam_keys,
                                             const double* hparam_values,
                                             const char* session_id, natgrad_session** out) {
  return Guard([&]() -> natgrad_status {
    if (client == nullptr || out == nullptr) return Invalid("natgrad: client or out is NULL");
    natgrad::v1::SessionConfig config;
    if (natgrad_status s = BuildSimpleConfig(n_blocks, names, kinds, ndims, dims, n_hparams,
                                             hparam_keys, hparam_values, &config);
        s != NATGRAD_OK) {
      return s;
    }
    return CreateFromConfig(client, config, session_id, out);
  });
}

natgrad_status natgrad_session_open(natgrad_client* client, const char* name,
                                    natgrad_session** out) {
  return Guard([&]() -> natgrad_status {
    if (client == nullptr || out == nullptr || name == nullptr) {
      return Invalid("natgrad: client, name or out is NULL");
    }
    auto session = client->client->GetSession(name);
    if (!session.ok()) return FromStatus(session.status());
    *out = NewSession(client->client, *session);
    return Ok();
  });
}

const char* natgrad_session_name(const natgrad_session* session) {
  return session == nullptr ? nullptr : session->name.c_str();
}

size_t natgrad_session_block_count(const natgrad_session* session) {
  return session == nullptr ? 0 : session->block_names.size();
}

const char* natgrad_session_block_name(const natgrad_session* session, size_t i) {
  if (session == nullptr || i >= session->block_names.size()) return nullptr;
  return session->block_names[i].c_str();
}

natgrad_status natgrad_session_last_step(natgrad_session* session, int64_t* out) {
  return Guard([&]() -> natgrad_status {
    if (session == nullptr || out == nullptr) return Invalid("natgrad: session or out is NULL");
    std::lock_guard<std::mutex> lock(session->mu);
    *out = session->stream->next_step() - 1;
    return Ok();
  });
}

natgrad_status natgrad_session_step(natgrad_session* session, size_t n_blocks,
                                    const char* const* names, const int32_t* ndims,
                                    const int64_t* dims, const float* const* gradients,
                                    const float* const* params, const int64_t* kfac_rows,
                                    const float* const* activations,
                                    const float* const* output_gradients, double loss,
                                    float* const* deltas) {
  return Guard([&]() {
    return Step<float>(session, n_blocks, names, ndims, dims, gradients, params, kfac_rows,
                       activations, output_gradients, loss, deltas);
  });
}

natgrad_status natgrad_session_step_f64(natgrad_session* session, size_t n_blocks,
                                        const char* const* names, const int32_t* ndims,
                                        const int64_t* dims, const double* const* gradients,
                                        const double* const* params, const int64_t* kfac_rows,
                                        const double* const* activations,
                                        const double* const* output_gradients, double loss,
                                        double* const* deltas) {
  return Guard([&]() {
    return Step<double>(session, n_blocks, names, ndims, dims, gradients, params, kfac_rows,
                        activations, output_gradients, loss, deltas);
  });
}

natgrad_status natgrad_session_delete(natgrad_session* session) {
  return Guard([&]() -> natgrad_status {
    if (session == nullptr) return Invalid("natgrad: session is NULL");
    std::lock_guard<std::mutex> lock(session->mu);
    // Detach our stream first so the server is not holding it open.
    session->stream->Close().IgnoreError();
    return FromStatus(session->client->DeleteSession(session->name));
  });
}

void natgrad_session_free(natgrad_session* session) {
  try {
    delete session;
  } catch (...) {
    // A destructor that throws has nowhere to report to; never unwind into C.
  }
}

}  // extern "C"
