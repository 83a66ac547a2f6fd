// The Step stream of one session (gRPC route_guide's callback reactor shape).
// Reads a step's messages, hands the step to the executor, queues the
// response, then reads the next step. At most one read and one write are
// outstanding; responses wait in a queue while a write is in flight.
#ifndef NATGRAD_SERVER_SERVICE_STEP_REACTOR_H_
#define NATGRAD_SERVER_SERVICE_STEP_REACTOR_H_

#include <atomic>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "natgrad/v1/step.pb.h"
#include "server/service/optimizer_service.h"
#include "server/service/step_assembler.h"

namespace natgrad::service {

class StepReactor final
    : public grpc::ServerBidiReactor<natgrad::v1::StepRequest, natgrad::v1::StepResponse> {
 public:
  StepReactor(const ServiceDependencies& deps, grpc::CallbackServerContext* context);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // gRPC operations decided under mu_ and started after releasing it, since
  // gRPC may run a reaction inline on the calling thread.
  struct Actions {
    const natgrad::v1::StepResponse* write = nullptr;
    bool read = false;
    std::optional<grpc::Status> finish;
  };

  absl::Status HandleMessage();
  void RunStep(AssembledStep step);
  // Finishes now if nothing is in flight, else once it completes.
  void FinishLocked(grpc::Status status, Actions& actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeWriteLocked(Actions& actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Apply(const Actions& actions);
  void Detach();

  const ServiceDependencies& deps_;
  grpc::CallbackServerContext* const context_;
  std::string tenant_;
  natgrad::v1::StepRequest request_;
  std::shared_ptr<session::Session> session_;
  std::optional<StepAssembler> assembler_;

  absl::Mutex mu_;
  std::deque<std::shared_ptr<const natgrad::v1::StepResponse>> writes_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  // Executor-side work in flight: a step being computed, or its gRPC
  // operations being started. The reactor cannot finish (and be deleted by
  // OnDone) while this is non-zero, because executor threads are not gRPC
  // reactions and gRPC does not wait for them.
  int busy_ ABSL_GUARDED_BY(mu_) = 0;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // Released when finishing, before the client can see the status, so a
  // client that reconnects at once is not refused as a second stream.
  std::atomic<bool> attached_{false};
  std::optional<grpc::Status> pending_finish_ ABSL_GUARDED_BY(mu_);
};

}  // namespace natgrad::service

#endif  // NATGRAD_SERVER_SERVICE_STEP_REACTOR_H_
