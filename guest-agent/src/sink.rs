//! Serialised writes on the control connection: responses to requests and unsolicited events.
//!
//! One lock covers every write, and a response can run a step (releasing a process) under that
//! lock, so an `Exit` event can never overtake the response that announced the process.
//! Events raised while no control connection exists are queued and sent on the next one.

use rootcell_protocol::{AgentMessage, Event, Response};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

/// Events kept while the host is disconnected; beyond this the oldest are dropped.
const MAX_QUEUED: usize = 1024;

#[derive(Default)]
struct Inner {
    events: Option<Box<dyn Write + Send>>,
    queued: VecDeque<Event>,
}

/// The writer side of the control connection, shared by all agent threads.
#[derive(Default)]
pub struct EventSink {
    inner: Mutex<Inner>,
}

impl EventSink {
    /// Creates a sink with no connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `w` the connection that receives events, and flushes queued events to it.
    pub fn attach(&self, mut w: Box<dyn Write + Send>) {
        let mut inner = self.lock();
        while let Some(event) = inner.queued.pop_front() {
            if rootcell_protocol::send(
                &mut w,
                &AgentMessage::Event {
                    event: event.clone(),
                },
            )
            .is_err()
            {
                inner.queued.push_front(event);
                return;
            }
        }
        inner.events = Some(w);
    }

    /// Sends an event now, or queues it until a connection is attached.
    pub fn event(&self, event: Event) {
        let mut inner = self.lock();
        if let Some(w) = inner.events.as_mut() {
            if rootcell_protocol::send(
                w,
                &AgentMessage::Event {
                    event: event.clone(),
                },
            )
            .is_ok()
            {
                return;
            }
            inner.events = None;
        }
        if inner.queued.len() >= MAX_QUEUED {
            inner.queued.pop_front();
        }
        inner.queued.push_back(event);
    }

    /// Runs `step` and writes its response to `w`, all while no event can be written.
    pub fn respond<W: Write>(
        &self,
        w: &mut W,
        id: u64,
        step: impl FnOnce() -> Response,
    ) -> std::io::Result<()> {
        let _guard = self.lock();
        let result = step();
        rootcell_protocol::send(w, &AgentMessage::Response { id, result })
            .map_err(std::io::Error::other)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<StdMutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn decode(buf: &[u8]) -> Vec<AgentMessage> {
        let mut r = buf;
        std::iter::from_fn(|| rootcell_protocol::recv(&mut r).unwrap()).collect()
    }

    #[test]
    fn events_queue_until_attached() {
        let sink = EventSink::new();
        sink.event(Event::Exit {
            process: "init".into(),
            status: 3,
        });
        let out = Shared::default();
        sink.attach(Box::new(out.clone()));
        sink.event(Event::Oom);
        let msgs = decode(&out.0.lock().unwrap());
        assert_eq!(
            msgs,
            vec![
                AgentMessage::Event {
                    event: Event::Exit {
                        process: "init".into(),
                        status: 3
                    }
                },
                AgentMessage::Event { event: Event::Oom }
            ]
        );
    }

    #[test]
    fn responses_carry_the_request_id() {
        let sink = EventSink::new();
        let mut out = Vec::new();
        sink.respond(&mut out, 9, || Response::Ok).unwrap();
        assert_eq!(
            decode(&out),
            vec![AgentMessage::Response {
                id: 9,
                result: Response::Ok
            }]
        );
    }
}
