//! Clock and key events into the archive (ETSI EN 319 421 asks that they be recorded).
//!
//! Every module already logs its events through `tracing` with an `event` field
//! (`sync_acquired`, `clock_sync`, `sync_lost`, `source_rejected`, `step_detected`,
//! `leap_applied`, `key_loaded`, `key_rollover`, `hsm_session_lost`, `hsm_session_replaced`,
//! `hsm_signature_invalid`, `hsm_key_replaced`, `hsm_recovered`, …). [`layer`] captures
//! exactly those (it selects callsites by their fields, so other logging costs nothing)
//! whatever the log level, and hands them to the archive's writer, which stores them with the
//! next commit.
//! Events that come before the archive is open (the key loaded at start-up) wait in a small
//! buffer. [`record`] is the same thing as a function, for code that does not log.

use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};

use super::queue::Queue;
use super::writer::Msg;
use crate::log_limit::LogLimit;

/// An event before the writer assigns it an instance and a position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub time_ns: u64,
    pub level: String,
    pub kind: String,
    pub message: String,
    /// The other fields as a JSON object.
    pub fields: String,
}

enum Sink {
    Buffer(Vec<Captured>),
    Attached(Arc<Queue>),
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Buffer(Vec::new()));

/// Events kept while no archive is open; later ones are dropped.
const BUFFER: usize = 1024;

fn deliver(event: Captured) {
    let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
    match &mut *sink {
        Sink::Attached(queue) => {
            if let Err(Msg::Event(event)) = queue.send(Msg::Event(event)) {
                if queue.is_closed() {
                    // The writer is gone (shutdown): keep what comes after it.
                    *sink = Sink::Buffer(vec![event]);
                } else {
                    // The writer hangs and its queue is full: the log has the event still.
                    drop(sink);
                    static LOG: LogLimit = LogLimit::new();
                    if let Some(left_out) = LOG.allow() {
                        // No `event` field: not an archive event itself.
                        tracing::warn!(
                            left_out,
                            kind = event.kind,
                            "an event is not archived: the archive's queue is full"
                        );
                    }
                }
            }
        }
        Sink::Buffer(buffer) => {
            if buffer.len() < BUFFER {
                buffer.push(event);
            }
        }
    }
}

/// Sends the buffered events and every later one to the writer.
pub(super) fn attach(queue: Arc<Queue>) {
    let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
    if let Sink::Buffer(buffer) = &mut *sink {
        for event in buffer.drain(..) {
            let _ = queue.send(Msg::Event(event));
        }
    }
    *sink = Sink::Attached(queue);
}

/// Stops sending to the writer (at shutdown); later events are buffered again (those that
/// came after its queue closed are already).
pub(super) fn detach() {
    let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
    if matches!(*sink, Sink::Attached(_)) {
        *sink = Sink::Buffer(Vec::new());
    }
}

/// Records an event in the archive (when one is open) without logging it.
pub fn record(kind: &str, level: tracing::Level, message: &str, fields: serde_json::Value) {
    deliver(Captured {
        time_ns: crate::clock::system_unix_ns(),
        level: level.as_str().to_ascii_lowercase(),
        kind: kind.to_string(),
        message: message.to_string(),
        fields: fields.to_string(),
    });
}

/// A `tracing` layer that stores every event that has an `event` field.
pub fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    EventLayer.with_filter(HasEventField)
}

struct HasEventField;

impl<S> Filter<S> for HasEventField {
    fn enabled(&self, meta: &tracing::Metadata<'_>, _: &Context<'_, S>) -> bool {
        meta.is_event() && meta.fields().field("event").is_some()
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if meta.is_event() && meta.fields().field("event").is_some() {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }
}

struct EventLayer;

impl<S: Subscriber> Layer<S> for EventLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let Some(kind) = visitor.kind else { return };
        deliver(Captured {
            time_ns: crate::clock::system_unix_ns(),
            level: event.metadata().level().as_str().to_ascii_lowercase(),
            kind,
            message: visitor.message,
            fields: serde_json::Value::Object(visitor.fields).to_string(),
        });
    }
}

#[derive(Default)]
struct Fields {
    kind: Option<String>,
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        match field.name() {
            "event" => {
                self.kind = Some(match value {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                })
            }
            "message" => {
                self.message = match value {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                }
            }
            name => {
                self.fields.insert(name.to_string(), value);
            }
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}
