//! Serialised writes on the control connections: responses to requests and unsolicited events.
//!
//! Each container has its own control connection (the one that created it), and its events go
//! there. One lock covers every write, and a response can run a step (releasing a process)
//! under that lock, so an `Exit` event can never overtake the response that announced the
//! process. Events raised while a container has no connection are queued and sent when one is
//! attached.

use rootcell_protocol::{AgentMessage, Event, Response};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::Mutex;

/// Events kept per container while its host is disconnected; beyond this the oldest are dropped.
const MAX_QUEUED: usize = 1024;

#[derive(Default)]
struct Channel {
    events: Option<Box<dyn Write + Send>>,
    queued: VecDeque<Event>,
}

/// The writer side of the control connections, shared by all agent threads.
#[derive(Default)]
pub struct EventSink {
    inner: Mutex<HashMap<String, Channel>>,
}

fn send_event(w: &mut Box<dyn Write + Send>, event: &Event) -> bool {
    let msg = AgentMessage::Event {
        event: event.clone(),
    };
    rootcell_protocol::send(w, &msg).is_ok()
}

impl EventSink {
    /// Creates a sink with no connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `w` the connection that receives `container`'s events, and flushes its queued
    /// events to it.
    pub fn attach(&self, container: &str, mut w: Box<dyn Write + Send>) {
        let mut inner = self.lock();
        let ch = inner.entry(container.to_string()).or_default();
        while let Some(event) = ch.queued.pop_front() {
            if !send_event(&mut w, &event) {
                ch.queued.push_front(event);
                return;
            }
        }
        ch.events = Some(w);
    }

    /// Forgets `container`'s connection and queued events (it has been removed).
    pub fn detach(&self, container: &str) {
        self.lock().remove(container);
    }

    /// Sends an event of `container` now, or queues it until a connection is attached.
    pub fn event(&self, container: &str, event: Event) {
        let mut inner = self.lock();
        let ch = inner.entry(container.to_string()).or_default();
        if let Some(w) = ch.events.as_mut() {
            if send_event(w, &event) {
                return;
            }
            ch.events = None;
        }
        if ch.queued.len() >= MAX_QUEUED {
            ch.queued.pop_front();
        }
        ch.queued.push_back(event);
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
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
        sink.event(
            "a",
            Event::Exit {
                process: "init".into(),
                status: 3,
            },
        );
        sink.event("b", Event::Oom);
        let out = Shared::default();
        sink.attach("a", Box::new(out.clone()));
        sink.event("a", Event::Oom);
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
    fn events_go_to_their_containers_connection() {
        let sink = EventSink::new();
        let (a, b) = (Shared::default(), Shared::default());
        sink.attach("a", Box::new(a.clone()));
        sink.attach("b", Box::new(b.clone()));
        sink.event("b", Event::Oom);
        assert!(decode(&a.0.lock().unwrap()).is_empty());
        assert_eq!(
            decode(&b.0.lock().unwrap()),
            vec![AgentMessage::Event { event: Event::Oom }]
        );
        // A removed container's later events are queued under a fresh entry, not sent to the
        // old connection.
        sink.detach("b");
        sink.event("b", Event::Oom);
        assert_eq!(decode(&b.0.lock().unwrap()).len(), 1);
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
