//! Every task request is answered, even one whose handler panics.
//!
//! ttrpc 0.9's sync server runs a request's handler on a worker thread and sends the reply when
//! the handler returns: a panic ends that thread and the request is never answered. containerd
//! 1.6 waits for most task requests (Create, Start, Delete, ...) with no deadline, so a panic
//! there hung the container and its `ctr` for good (the missing-logger hang: std's spawn panicked
//! in Create). [`CatchPanics`] answers such a request with an error that carries the panic's
//! message; the panic hook in `main` still writes the panic, with its location, to the log.

use containerd_shim as shim;
use shim::api;
use shim::protos::ttrpc::{get_status, Code, Error};
use shim::{TtrpcContext, TtrpcResult};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A task service whose handlers' panics become error replies.
pub struct CatchPanics<T>(pub T);

/// Runs the handler of `method`; a panic becomes an INTERNAL error with the panic's message.
fn answered<R>(method: &str, handler: impl FnOnce() -> TtrpcResult<R>) -> TtrpcResult<R> {
    // AssertUnwindSafe: the service stays in use after a panic, as it did when the panic ended
    // only a worker thread; its state mutex is taken poison-tolerantly, and what a half-done
    // request left behind is for containerd's cleanup of the failed request (Delete).
    catch_unwind(AssertUnwindSafe(handler)).unwrap_or_else(|payload| {
        let message = panic_message(payload.as_ref());
        Err(Error::RpcStatus(get_status(
            Code::INTERNAL,
            format!("the shim panicked in {method}: {message}"),
        )))
    })
}

/// Runs `body`, all the work of a thread whose loss would lose, for good, events containerd
/// waits for; a panic in it ends the shim ([`end_shim`]). `what` names the thread and `lost`
/// says what would be lost, for the log.
pub fn or_end_shim<R>(what: &str, lost: &str, body: impl FnOnce() -> R) -> R {
    // AssertUnwindSafe: after a panic nothing the body held is used; the shim ends.
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let why = format!("it panicked: {}", panic_message(payload.as_ref()));
        end_shim(what, &why, lost)
    })
}

/// Ends the shim because `what` ended (`why`), after saying so in containerd's log (the panic
/// hook in `main` has logged a panic with its location).
///
/// Caught and carried on from, the end of such a thread would lose `lost` silently and for
/// good (containerd's waiters have no deadline). A dead shim is a failure containerd handles:
/// it sees the connection close, runs `shim delete` (`rootcell delete --force`) for each task,
/// and reports each as exited (137, what delete answers).
pub fn end_shim(what: &str, why: &str, lost: &str) -> ! {
    log::error!(
        "{what} ended ({why}); ending the shim, whose {lost}, so that containerd cleans up \
         after it"
    );
    std::process::abort()
}

/// The message of a panic's payload (`panic!` gives a `&str` or a `String`).
// Also in guest-agent/src/threads.rs and vmm/src/exit.rs (panic_text): six lines of std
// downcasts, not worth a dependency of the shim on rootcell-protocol, their only common crate.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Implements every method of the task service as the wrapped service's, [`answered`].
macro_rules! answer_every_method {
    ($($method:ident($request:ty) -> $response:ty;)*) => {
        impl<T: shim::Task> shim::Task for CatchPanics<T> {
            $(
                fn $method(&self, ctx: &TtrpcContext, req: $request) -> TtrpcResult<$response> {
                    answered(stringify!($method), || self.0.$method(ctx, req))
                }
            )*
        }
    };
}

answer_every_method! {
    state(api::StateRequest) -> api::StateResponse;
    create(api::CreateTaskRequest) -> api::CreateTaskResponse;
    start(api::StartRequest) -> api::StartResponse;
    delete(api::DeleteRequest) -> api::DeleteResponse;
    pids(api::PidsRequest) -> api::PidsResponse;
    pause(api::PauseRequest) -> api::Empty;
    resume(api::ResumeRequest) -> api::Empty;
    checkpoint(api::CheckpointTaskRequest) -> api::Empty;
    kill(api::KillRequest) -> api::Empty;
    exec(api::ExecProcessRequest) -> api::Empty;
    resize_pty(api::ResizePtyRequest) -> api::Empty;
    close_io(api::CloseIORequest) -> api::Empty;
    update(api::UpdateTaskRequest) -> api::Empty;
    wait(api::WaitRequest) -> api::WaitResponse;
    stats(api::StatsRequest) -> api::StatsResponse;
    connect(api::ConnectRequest) -> api::ConnectResponse;
    shutdown(api::ShutdownRequest) -> api::Empty;
}

#[cfg(test)]
mod tests {
    use super::*;
    use shim::protos::ttrpc::{context, Client, Server};
    use shim::protos::{create_task, TaskClient};
    use std::sync::Arc;

    /// A service whose Create panics and whose State works.
    struct PanicsInCreate;

    impl shim::Task for PanicsInCreate {
        fn create(
            &self,
            _ctx: &TtrpcContext,
            req: api::CreateTaskRequest,
        ) -> TtrpcResult<api::CreateTaskResponse> {
            panic!("no bundle for {}", req.id);
        }

        fn state(
            &self,
            _ctx: &TtrpcContext,
            req: api::StateRequest,
        ) -> TtrpcResult<api::StateResponse> {
            let mut r = api::StateResponse::new();
            r.id = req.id;
            Ok(r)
        }
    }

    /// Serves `service` over a real ttrpc socket (as the shim serves containerd), sends it a
    /// Create for "c1" with a deadline of `wait`, and returns the outcome with the client and
    /// server for further requests.
    fn create_over_ttrpc(
        service: Arc<dyn shim::Task + Send + Sync>,
        socket: &std::path::Path,
        wait: std::time::Duration,
    ) -> (TtrpcResult<api::CreateTaskResponse>, TaskClient, Server) {
        let _ = std::fs::remove_file(socket);
        let address = format!("unix://{}", socket.display());
        let mut server = Server::new()
            .bind(&address)
            .unwrap()
            .register_service(create_task(service));
        server.start().unwrap();
        let client = TaskClient::new(Client::connect(&address).unwrap());
        let mut req = api::CreateTaskRequest::new();
        req.id = "c1".into();
        let outcome = client.create(context::with_timeout(wait.as_nanos() as i64), &req);
        (outcome, client, server)
    }

    #[test]
    fn a_handlers_panic_is_answered_with_its_message() {
        let dir = std::env::temp_dir().join(format!("rc-shim-guard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wait = std::time::Duration::from_secs(20);
        let (outcome, client, server) = create_over_ttrpc(
            Arc::new(CatchPanics(PanicsInCreate)),
            &dir.join("guarded.sock"),
            wait,
        );
        match outcome {
            Err(Error::RpcStatus(s)) => {
                assert_eq!(s.code(), Code::INTERNAL, "{s:?}");
                assert_eq!(s.message(), "the shim panicked in create: no bundle for c1");
            }
            other => panic!("expected an error reply, got {other:?}"),
        }
        // The connection still serves, and methods that do not panic answer as before.
        let mut req = api::StateRequest::new();
        req.id = "c1".into();
        let state = client
            .state(context::with_timeout(wait.as_nanos() as i64), &req)
            .unwrap();
        assert_eq!(state.id, "c1");
        server.shutdown();

        // Without the guard, the request is never answered: the client's deadline ends it (what
        // containerd, which sets none for Create, never gets).
        let (outcome, _client, server) = create_over_ttrpc(
            Arc::new(PanicsInCreate),
            &dir.join("bare.sock"),
            std::time::Duration::from_secs(1),
        );
        match outcome {
            Err(Error::RpcStatus(s)) => panic!("ttrpc now answers a panic by itself: {s:?}"),
            Err(e) => assert!(e.to_string().contains("timeout"), "{e}"),
            Ok(r) => panic!("a panicking Create succeeded: {r:?}"),
        }
        server.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
