/* The C API from a C99 program: what a C (or FFI) user writes. Run by both
 * C API tests, against an in-process server and against a natgrad-server
 * child process through libnatgrad_c.so. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "client/c/natgrad.h"

int natgrad_c_smoke(const char* target, char* message, size_t message_size);

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      snprintf(message, message_size, "%s:%d: %s failed (last error: %s)", __FILE__, \
               __LINE__, #cond, natgrad_last_error());                              \
      goto done;                                                                    \
    }                                                                               \
  } while (0)

/* Returns 0 when every check passed, else 1 with a description in message. */
int natgrad_c_smoke(const char* target, char* message, size_t message_size) {
  int failed = 1;
  natgrad_client* client = NULL;
  natgrad_session* session = NULL;
  natgrad_session* reopened = NULL;
  natgrad_session* missing = NULL;
  natgrad_client_options options;
  char name[256];
  int64_t last = -1;
  size_t i;

  /* Two blocks: w is 2x3 (sgd), b is a vector of 3 (adam). */
  const char* names[2] = {"w", "b"};
  const char* kinds[2] = {"sgd", "adam"};
  const int32_t ndims[2] = {2, 1};
  const int64_t dims[3] = {2, 3, 3};
  const char* keys[2] = {"learning_rate", "b:learning_rate"};
  const double values[2] = {0.5, 0.01};
  float gw[6] = {1, -2, 3, -4, 5, -6};
  float gb[3] = {0.25f, -0.5f, 1.0f};
  float dw[6], db[3];
  const float* grads[2];
  float* deltas[2];
  const char* wrong_names[1] = {"nope"};
  const int32_t wrong_ndims[1] = {2};
  const int64_t wrong_dims[2] = {3, 2};

  grads[0] = gw;
  grads[1] = gb;
  deltas[0] = dw;
  deltas[1] = db;
  message[0] = '\0';

  CHECK(natgrad_abi_version() == NATGRAD_C_ABI_VERSION);
  CHECK(strcmp(natgrad_status_name(NATGRAD_INVALID_ARGUMENT), "INVALID_ARGUMENT") == 0);

  natgrad_client_options_init(&options);
  options.initial_backoff_ms = 5;
  CHECK(natgrad_client_new_with_options(target, NULL, &options, &client) == NATGRAD_OK);
  CHECK(natgrad_session_create_simple(client, 2, names, kinds, ndims, dims, 2, keys, values,
                                      NULL, &session) == NATGRAD_OK);
  CHECK(strncmp(natgrad_session_name(session), "sessions/", 9) == 0);
  CHECK(strlen(natgrad_session_name(session)) < sizeof(name));
  strcpy(name, natgrad_session_name(session));
  CHECK(natgrad_session_last_step(session, &last) == NATGRAD_OK && last == 0);

  /* Step 1: plain SGD gives -lr * g; Adam's first step is -lr * sign(g). */
  CHECK(natgrad_session_step(session, 2, names, ndims, dims, grads, NULL, NULL, NULL, NULL, NAN,
                             deltas) == NATGRAD_OK);
  CHECK(strcmp(natgrad_last_error(), "") == 0);
  for (i = 0; i < 6; ++i) CHECK(fabsf(dw[i] + 0.5f * gw[i]) < 1e-6f);
  for (i = 0; i < 3; ++i) CHECK(fabsf(db[i] + 0.01f * (gb[i] > 0 ? 1.0f : -1.0f)) < 1e-5f);
  CHECK(natgrad_session_last_step(session, &last) == NATGRAD_OK && last == 1);

  /* A rejected step (shape) says why and changes nothing. */
  dw[0] = 42.0f;
  CHECK(natgrad_session_step(session, 1, names, wrong_ndims, wrong_dims, grads, NULL, NULL, NULL,
                             NULL, 1.5, deltas) == NATGRAD_INVALID_ARGUMENT);
  CHECK(strlen(natgrad_last_error()) > 0);
  CHECK(dw[0] == 42.0f);
  CHECK(natgrad_session_step(session, 1, wrong_names, ndims, dims, grads, NULL, NULL, NULL, NULL,
                             NAN, deltas) == NATGRAD_INVALID_ARGUMENT);
  CHECK(natgrad_session_last_step(session, &last) == NATGRAD_OK && last == 1);
  CHECK(natgrad_session_step(NULL, 2, names, ndims, dims, grads, NULL, NULL, NULL, NULL, NAN,
                             deltas) == NATGRAD_INVALID_ARGUMENT);

  /* Hand the session over to a new handle, as a restarted job would. */
  natgrad_session_free(session);
  session = NULL;
  CHECK(natgrad_session_open(client, name, &reopened) == NATGRAD_OK);
  CHECK(natgrad_session_last_step(reopened, &last) == NATGRAD_OK && last == 1);
  CHECK(natgrad_session_block_count(reopened) == 2);
  CHECK(strcmp(natgrad_session_block_name(reopened, 0), "w") == 0);
  CHECK(strcmp(natgrad_session_block_name(reopened, 1), "b") == 0);
  CHECK(natgrad_session_block_name(reopened, 2) == NULL);
  CHECK(natgrad_session_step(reopened, 2, names, ndims, dims, grads, NULL, NULL, NULL, NULL, 0.5,
                             deltas) == NATGRAD_OK);
  for (i = 0; i < 6; ++i) CHECK(fabsf(dw[i] + 0.5f * gw[i]) < 1e-6f);
  CHECK(natgrad_session_last_step(reopened, &last) == NATGRAD_OK && last == 2);

  CHECK(natgrad_session_delete(reopened) == NATGRAD_OK);
  CHECK(natgrad_session_step(reopened, 2, names, ndims, dims, grads, NULL, NULL, NULL, NULL, NAN,
                             deltas) == NATGRAD_NOT_FOUND);
  CHECK(natgrad_session_open(client, name, &missing) == NATGRAD_NOT_FOUND);
  CHECK(missing == NULL);
  CHECK(strlen(natgrad_last_error()) > 0);
  failed = 0;

done:
  natgrad_session_free(session);
  natgrad_session_free(reopened);
  natgrad_session_free(missing);
  natgrad_client_free(client);
  return failed;
}
