/* A C99 program built against an installed natgrad (pkg-config natgrad, or
 * natgrad::c / natgrad::c_static from CMake): SGD on 0.5 * |w - t|^2 through
 * libnatgrad_c, each update checked against w_k - t = (1 - lr)^k (w_0 - t),
 * plus one rejected step that must leave the session as it was. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <natgrad.h>

#define STEPS 5

static int fail(const char* what, natgrad_status s) {
  fprintf(stderr, "%s: %s: %s\n", what, natgrad_status_name(s), natgrad_last_error());
  return 1;
}

int main(int argc, char** argv) {
  const double lr = 0.25;
  const float target[3] = {1.0f, -2.0f, 3.0f};
  const char* names[1] = {"w"};
  const char* kinds[1] = {"sgd"};
  const int32_t ndims[1] = {1};
  const int64_t dims[1] = {3};
  const char* keys[1] = {"learning_rate"};
  const double values[1] = {0.25};
  const char* wrong_names[1] = {"no_such_block"};
  float w[3] = {0, 0, 0};
  float grad[3], delta[3];
  const float* grads[1];
  float* deltas[1];
  natgrad_client* client = NULL;
  natgrad_session* session = NULL;
  natgrad_status s;
  int64_t last = -1;
  int k, i;

  if (argc != 2) {
    fprintf(stderr, "usage: %s host:port\n", argv[0]);
    return 2;
  }
  if (natgrad_abi_version() != NATGRAD_C_ABI_VERSION) {
    fprintf(stderr, "ABI %d, header %d\n", (int)natgrad_abi_version(), NATGRAD_C_ABI_VERSION);
    return 1;
  }
  grads[0] = grad;
  deltas[0] = delta;
  if ((s = natgrad_client_new(argv[1], NULL, &client)) != NATGRAD_OK) return fail("client", s);
  s = natgrad_session_create_simple(client, 1, names, kinds, ndims, dims, 1, keys, values, NULL,
                                    &session);
  if (s != NATGRAD_OK) return fail("create", s);

  for (k = 1; k <= STEPS; ++k) {
    for (i = 0; i < 3; ++i) grad[i] = w[i] - target[i];
    s = natgrad_session_step(session, 1, names, ndims, dims, grads, NULL, NULL, NULL, NULL, NAN,
                             deltas);
    if (s != NATGRAD_OK) return fail("step", s);
    for (i = 0; i < 3; ++i) {
      const double expected = target[i] + pow(1.0 - lr, k) * (0.0 - target[i]);
      w[i] += delta[i];
      if (fabs(w[i] - expected) > 1e-5) {
        fprintf(stderr, "step %d: w[%d] = %.8f, expected %.8f\n", k, i, w[i], expected);
        return 1;
      }
    }
  }
  s = natgrad_session_step(session, 1, wrong_names, ndims, dims, grads, NULL, NULL, NULL, NULL,
                           NAN, deltas);
  if (s != NATGRAD_INVALID_ARGUMENT || strlen(natgrad_last_error()) == 0) {
    fprintf(stderr, "unknown block: got %s\n", natgrad_status_name(s));
    return 1;
  }
  if ((s = natgrad_session_last_step(session, &last)) != NATGRAD_OK) return fail("last_step", s);
  if (last != STEPS) {
    fprintf(stderr, "last step %ld, expected %d\n", (long)last, STEPS);
    return 1;
  }
  printf("c_consumer: %d steps ok on %s\n", STEPS, natgrad_session_name(session));
  if ((s = natgrad_session_delete(session)) != NATGRAD_OK) return fail("delete", s);
  natgrad_session_free(session);
  natgrad_client_free(client);
  return 0;
}
