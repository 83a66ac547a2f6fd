/* natgrad C ABI: a small, stable C interface over the C++ client
 * (client/cpp/natgrad_client.h) for languages with a C FFI (Julia, ...).
 *
 * Conventions (all functions):
 *   - Every fallible function returns a natgrad_status, whose values are the
 *     gRPC status codes (docs/architecture.md lists what the server uses each for).
 *     Errors detected in this library (NULL pointers, bad shapes, unknown
 *     hyperparameter names) are NATGRAD_INVALID_ARGUMENT.
 *   - natgrad_last_error() is the message of the most recent call made on the
 *     calling thread ("" after a success).
 *   - No C++ exception crosses this interface.
 *   - Tensors are float32 (or float64 with the _f64 functions), dense,
 *     row-major (C order), matching the wire (docs/architecture.md).
 *   - Output pointers are written only on success.
 *   - A natgrad_client may be used from several threads. A natgrad_session
 *     may too, but its calls are serialised (steps are ordered anyway).
 *   - Handles are reference counted internally: freeing a client while its
 *     sessions are alive is allowed (the sessions keep the connection).
 *
 * Do not load libnatgrad_c.so into a process that also links natgrad's C++
 * protobuf code (natgrad_client, the server): the shared library carries its
 * own hidden copy, and libprotobuf aborts when the same .proto file is
 * registered twice. Such processes link the static `natgrad_c_static`.
 */
#ifndef NATGRAD_CLIENT_C_NATGRAD_H_
#define NATGRAD_CLIENT_C_NATGRAD_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define NATGRAD_C_API
#elif defined(__GNUC__)
#define NATGRAD_C_API __attribute__((visibility("default")))
#else
#define NATGRAD_C_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped when a function's signature or a struct's layout changes. */
#define NATGRAD_C_ABI_VERSION 1

/* gRPC status codes, same numbers. */
typedef enum natgrad_status {
  NATGRAD_OK = 0,
  NATGRAD_CANCELLED = 1,
  NATGRAD_UNKNOWN = 2,
  NATGRAD_INVALID_ARGUMENT = 3,
  NATGRAD_DEADLINE_EXCEEDED = 4,
  NATGRAD_NOT_FOUND = 5,
  NATGRAD_ALREADY_EXISTS = 6,
  NATGRAD_PERMISSION_DENIED = 7,
  NATGRAD_RESOURCE_EXHAUSTED = 8,
  NATGRAD_FAILED_PRECONDITION = 9,
  NATGRAD_ABORTED = 10,
  NATGRAD_OUT_OF_RANGE = 11,
  NATGRAD_UNIMPLEMENTED = 12,
  NATGRAD_INTERNAL = 13,
  NATGRAD_UNAVAILABLE = 14,
  NATGRAD_DATA_LOSS = 15,
  NATGRAD_UNAUTHENTICATED = 16
} natgrad_status;

/* A connection to natgrad-server (one gRPC channel). */
typedef struct natgrad_client natgrad_client;
/* One server-side session plus this process's Step stream to it. */
typedef struct natgrad_session natgrad_session;

/* Connection settings; fill with natgrad_client_options_init first, then
 * change what you need, so fields added later get their defaults. */
typedef struct natgrad_client_options {
  /* Reconnect-and-resend attempts for one step after a dropped stream or an
   * unreachable server (default 8); 0 fails on the first error. */
  int32_t max_retries;
  /* First backoff between those attempts, doubled each time (default 20). */
  int32_t initial_backoff_ms;
  /* Largest message sent or received (default 256 MiB). */
  int64_t max_message_bytes;
  /* Blocks per stream message when a step is split (default 64). */
  int32_t max_blocks_per_message;
} natgrad_client_options;

/* NATGRAD_C_ABI_VERSION of the loaded library (check it from an FFI). */
NATGRAD_C_API int32_t natgrad_abi_version(void);

/* The message of the last call on this thread; "" after a success. The
 * pointer stays valid until the next natgrad_* call on this thread. */
NATGRAD_C_API const char* natgrad_last_error(void);

/* "OK", "INVALID_ARGUMENT", ...: the gRPC name of a status code. Static
 * storage; "UNKNOWN" for numbers outside the enum. */
NATGRAD_C_API const char* natgrad_status_name(int32_t status);

/* Sets every field of *options to its default. NULL is ignored. */
NATGRAD_C_API void natgrad_client_options_init(natgrad_client_options* options);

/* Connects (lazily, as gRPC does) to `target` ("host:port"), insecure.
 * `bearer_token` may be NULL or "" for none; otherwise every call carries
 * "authorization: Bearer <token>". On success *out owns a new client. */
NATGRAD_C_API natgrad_status natgrad_client_new(const char* target, const char* bearer_token,
                                                natgrad_client** out);

/* natgrad_client_new with explicit options (NULL: defaults). */
NATGRAD_C_API natgrad_status natgrad_client_new_with_options(
    const char* target, const char* bearer_token, const natgrad_client_options* options,
    natgrad_client** out);

/* Releases the caller's reference. NULL is ignored. */
NATGRAD_C_API void natgrad_client_free(natgrad_client* client);

/* Creates a session from a serialized natgrad.v1.SessionConfig
 * (proto/natgrad/v1/session.proto): the whole configuration surface.
 * `session_id` may be NULL (the server picks an unguessable id) or
 * [a-z0-9-]{4,63}. On success *out owns a new session handle. */
NATGRAD_C_API natgrad_status natgrad_session_create(natgrad_client* client,
                                                    const void* config, size_t config_size,
                                                    const char* session_id,
                                                    natgrad_session** out);

/* Creates a session without protobuf: n_blocks blocks, block i named
 * names[i], of kind kinds[i] ("sgd", "adam", "shampoo", "soap",
 * "kfac_dense" or "ekfac") and shape
 * dims[off_i .. off_i + ndims[i]) where dims holds all shapes one after
 * another (off_i = ndims[0] + ... + ndims[i-1]). kfac_dense and ekfac
 * blocks are 2-D [d_out, d_in (+1 with has_bias)].
 *
 * Hyperparameters are n_hparams (key, value) pairs. A plain key applies to
 * every block whose kind has it and must apply to at least one; a key
 * "<block name>:<key>" applies to that block only and wins over a plain key.
 * A key not given keeps the server's default. Keys (constant schedules;
 * booleans are 0 or 1):
 *   sgd:        learning_rate momentum nesterov weight_decay
 *   adam:       learning_rate beta1 beta2 epsilon weight_decay
 *               decoupled_weight_decay
 *   shampoo:    learning_rate weight_decay beta1 beta2 epsilon
 *               bias_correction precondition_frequency
 *               start_preconditioning_step max_preconditioner_dim
 *   soap:       learning_rate weight_decay beta1 beta2 shampoo_beta epsilon
 *               bias_correction precondition_frequency max_precond_dim
 *               eigh_refresh (1: refresh by eigh, 0: power iteration + QR)
 *   kfac_dense: learning_rate damping momentum weight_decay has_bias
 *               ema_decay inverse_period eigen_exact
 *   ekfac:      learning_rate damping momentum weight_decay has_bias
 *               ema_decay inverse_period (raw statistics with every step)
 *   session (plain keys only): state_float64 (server state in float64),
 *               kl_clip (kappa; > 0 enables KL clipping of K-FAC blocks)
 * Anything else (schedules, Gaussian blocks, ...) needs
 * natgrad_session_create. `session_id` as there. */
NATGRAD_C_API natgrad_status natgrad_session_create_simple(
    natgrad_client* client, size_t n_blocks, const char* const* names,
    const char* const* kinds, const int32_t* ndims, const int64_t* dims, size_t n_hparams,
    const char* const* hparam_keys, const double* hparam_values, const char* session_id,
    natgrad_session** out);

/* Opens an existing session by name ("sessions/<id>"), e.g. after a restart
 * of the training job; steps continue after the session's last step. */
NATGRAD_C_API natgrad_status natgrad_session_open(natgrad_client* client, const char* name,
                                                  natgrad_session** out);

/* The session's name, "sessions/<id>". Valid while the handle lives; NULL
 * for a NULL handle. */
NATGRAD_C_API const char* natgrad_session_name(const natgrad_session* session);

/* Number of blocks of the session and the name of block i (0-based, in
 * configuration order); the name is valid while the handle lives, NULL for a
 * NULL handle or i out of range. */
NATGRAD_C_API size_t natgrad_session_block_count(const natgrad_session* session);
NATGRAD_C_API const char* natgrad_session_block_name(const natgrad_session* session, size_t i);

/* The last step applied through (or, after open, before) this handle; 0
 * before the first. The next step gets number *out + 1. */
NATGRAD_C_API natgrad_status natgrad_session_last_step(natgrad_session* session,
                                                       int64_t* out);

/* Sends one step and writes the updates. For each of the n_blocks blocks:
 *   names[i]        block name as configured;
 *   ndims[i], dims  the gradient's shape, laid out as in
 *                   natgrad_session_create_simple;
 *   gradients[i]    dL/dW of the mean loss, prod(shape) values;
 *   params          NULL, or per block NULL or the current parameter values
 *                   (same shape; needed by weight decay);
 *   kfac_rows       NULL, or per block the number n of rows of K-FAC
 *                   statistics (0: none for this block). For n > 0,
 *                   activations[i] is n x d_in and output_gradients[i] is
 *                   n x d_out, row-major, with d_in/d_out from the block's
 *                   configuration (activations exclude the bias column: the
 *                   server appends the 1). activations/output_gradients may
 *                   be NULL when kfac_rows is NULL;
 *   deltas[i]       output: prod(shape) values; the caller does W += delta.
 * `loss` is the loss at these parameters, or NaN for none (it drives
 * adaptive damping). A step the server rejects changes nothing on the
 * server and the step number does not advance; deltas are untouched. A
 * dropped connection is retried with the same step number (max_retries),
 * so a step is applied exactly once. Steps after the server's last durable
 * one are kept (at most 1000 steps, 1 GiB) and sent again, checked bit for
 * bit, after a reconnect to a server that restarted behind them;
 * NATGRAD_DATA_LOSS when it is further behind than the kept steps,
 * NATGRAD_NOT_FOUND when the session is gone. */
NATGRAD_C_API natgrad_status natgrad_session_step(
    natgrad_session* session, size_t n_blocks, const char* const* names, const int32_t* ndims,
    const int64_t* dims, const float* const* gradients, const float* const* params,
    const int64_t* kfac_rows, const float* const* activations,
    const float* const* output_gradients, double loss, float* const* deltas);

/* natgrad_session_step with float64 tensors on the wire and in memory. */
NATGRAD_C_API natgrad_status natgrad_session_step_f64(
    natgrad_session* session, size_t n_blocks, const char* const* names, const int32_t* ndims,
    const int64_t* dims, const double* const* gradients, const double* const* params,
    const int64_t* kfac_rows, const double* const* activations,
    const double* const* output_gradients, double loss, double* const* deltas);

/* Deletes the session on the server (its state is gone). The handle must
 * still be freed; later steps through it fail with NATGRAD_NOT_FOUND. */
NATGRAD_C_API natgrad_status natgrad_session_delete(natgrad_session* session);

/* Closes the Step stream and releases the handle; the server-side session
 * stays (open it again by name). NULL is ignored. */
NATGRAD_C_API void natgrad_session_free(natgrad_session* session);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* NATGRAD_CLIENT_C_NATGRAD_H_ */
