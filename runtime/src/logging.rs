//! Log output: one line per event, as text or as the JSON runc writes (`level`, `msg`, `time`),
//! plus a closing line per span with its duration when `--debug` is on (benchmarks read those).

use serde_json::Value;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Line format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `time level msg key=value ...`
    Text,
    /// `{"level":..,"msg":..,"time":..,...}`, what containerd's shim parses.
    Json,
}

/// The fd of the log file the global subscriber writes to, once [`init`] opened one (-1
/// before): the virtio-fs back end's threads, which have an fd table of their own, get a
/// pipe relayed to it at that number.
static FILE_FD: AtomicI32 = AtomicI32::new(-1);

/// The fd number of the log file [`init`] opened, if it did.
pub fn file_fd() -> Option<RawFd> {
    Some(FILE_FD.load(Ordering::SeqCst)).filter(|&fd| fd >= 0)
}

/// Installs the global subscriber writing to `file` (appending) or to `fallback`.
pub fn init(file: Option<&Path>, fallback: Box<dyn Write + Send>, format: Format, debug: bool) {
    let mut fd = -1;
    let (sink, max): (Box<dyn Write + Send>, Level) = match file {
        Some(p) => match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => {
                fd = f.as_raw_fd();
                (Box::new(f), if debug { Level::DEBUG } else { Level::INFO })
            }
            Err(_) => (fallback, Level::WARN),
        },
        None => (fallback, if debug { Level::DEBUG } else { Level::WARN }),
    };
    let layer = LineLayer {
        sink: Mutex::new(sink),
        format,
        max,
        spans: debug,
    };
    // Only the first subscriber is installed; a later one's file is closed with it.
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_ok()
    {
        FILE_FD.store(fd, Ordering::SeqCst);
    }
}

/// The `--log` file and format named in a raw command line (the last of each wins, as runc
/// parses them), for errors found before the command line could be parsed; `--log-format`
/// counts as JSON (what containerd's shim asks for) unless it says `text`.
pub fn early_target(args: &[OsString]) -> Option<(PathBuf, Format)> {
    let mut log = None;
    let mut format = Format::Json;
    let mut it = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (a.to_string(), None),
        };
        if flag != "--log" && flag != "--log-format" {
            continue;
        }
        let Some(value) = inline.or_else(|| it.next().map(|v| v.into_owned())) else {
            break;
        };
        if flag == "--log" {
            log = Some(PathBuf::from(value));
        } else {
            format = if value == "text" {
                Format::Text
            } else {
                Format::Json
            };
        }
    }
    log.filter(|l| !l.as_os_str().is_empty())
        .map(|l| (crate::paths::absolute(&l), format))
}

/// Appends one error line to the `--log` file of a raw command line, if it names one: the
/// shim reads the runtime's errors from there, also those from before logging was set up.
pub fn early_error(args: &[OsString], msg: &str) {
    let Some((path, format)) = early_target(args) else {
        return;
    };
    let mut line = render(format, "error", msg, &[], &crate::timefmt::now());
    line.push('\n');
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&path) {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Writes every event at or above `max` as one line.
struct LineLayer {
    sink: Mutex<Box<dyn Write + Send>>,
    format: Format,
    max: Level,
    spans: bool,
}

/// Per-span data kept in the registry's extensions.
struct SpanInfo {
    start: Instant,
    fields: Vec<(String, Value)>,
}

/// Collects an event's or span's fields as strings.
#[derive(Default)]
struct Fields {
    msg: String,
    rest: Vec<(String, Value)>,
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
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.msg = value
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
        } else {
            self.rest.push((field.name().to_string(), value));
        }
    }
}

/// Renders one log line (without the newline).
pub fn render(
    format: Format,
    level: &str,
    msg: &str,
    fields: &[(String, Value)],
    time: &str,
) -> String {
    match format {
        Format::Json => {
            let mut obj = serde_json::Map::new();
            obj.insert("level".into(), level.into());
            obj.insert("msg".into(), msg.into());
            obj.insert("time".into(), time.into());
            for (k, v) in fields {
                if !obj.contains_key(k) {
                    obj.insert(k.clone(), v.clone());
                }
            }
            serde_json::Value::Object(obj).to_string()
        }
        Format::Text => {
            let mut s = format!("{time} {level:<5} {msg}");
            for (k, v) in fields {
                match v.as_str() {
                    Some(text) => write!(s, " {k}={text}"),
                    None => write!(s, " {k}={v}"),
                }
                .ok();
            }
            s
        }
    }
}

impl LineLayer {
    fn emit(&self, level: &str, msg: &str, fields: &[(String, Value)]) {
        let mut line = render(self.format, level, msg, fields, &crate::timefmt::now());
        line.push('\n');
        if let Ok(mut w) = self.sink.lock() {
            let _ = w.write_all(line.as_bytes());
            let _ = w.flush();
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for LineLayer {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanInfo {
                start: Instant::now(),
                fields: f.rest,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        // Libraries (fuse-backend-rs, vhost) log chatty multi-line info; only their warnings
        // and errors are ours to show unless debugging.
        let ours = meta.target().starts_with("rootcell");
        let limit = if ours || self.spans {
            self.max
        } else {
            self.max.min(Level::WARN)
        };
        if *meta.level() > limit {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if let Some(scope) = ctx.event_scope(event) {
            let names: Vec<&str> = scope.from_root().map(|s| s.name()).collect();
            f.rest.push(("span".into(), names.join(">").into()));
        }
        f.rest.push(("pid".into(), std::process::id().into()));
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        self.emit(&level, &f.msg, &f.rest);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        if !self.spans {
            return;
        }
        let Some(span) = ctx.span(&id) else { return };
        let ext = span.extensions();
        let Some(info) = ext.get::<SpanInfo>() else {
            return;
        };
        let mut fields = info.fields.clone();
        let ms = info.start.elapsed().as_secs_f64() * 1000.0;
        fields.push(("span".into(), span.name().into()));
        fields.push(("elapsed_ms".into(), ((ms * 10.0).round() / 10.0).into()));
        fields.push(("pid".into(), std::process::id().into()));
        self.emit("debug", &format!("{} done", span.name()), &fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_error_line_has_runc_shape() {
        let line = render(
            Format::Json,
            "error",
            "container x does not exist",
            &[],
            "2024-01-01T00:00:00.000000000Z",
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container x does not exist");
        assert_eq!(v["time"], "2024-01-01T00:00:00.000000000Z");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn extra_fields_do_not_override_msg() {
        let f = vec![
            ("msg".to_string(), "x".into()),
            ("id".to_string(), "c1".into()),
        ];
        let v: serde_json::Value =
            serde_json::from_str(&render(Format::Json, "info", "hello", &f, "t")).unwrap();
        assert_eq!(v["msg"], "hello");
        assert_eq!(v["id"], "c1");
    }

    #[test]
    fn early_errors_reach_the_last_log_file_named() {
        let d = tempfile::tempdir().unwrap();
        let first = d.path().join("first.json");
        let last = d.path().join("last.json");
        let args: Vec<OsString> = [
            "rootcell",
            "--log",
            first.to_str().unwrap(),
            "--log-format",
            "text",
            &format!("--log={}", last.display()),
            "--log-format=json",
            "create",
            "--bogus",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(early_target(&args), Some((last.clone(), Format::Json)));
        early_error(&args, "unexpected argument '--bogus' found");
        assert!(!first.exists());
        let v: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&last).unwrap().trim()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "unexpected argument '--bogus' found");
        assert!(v["time"].as_str().is_some_and(|t| !t.is_empty()));
        let none: Vec<OsString> = ["rootcell", "state", "--log"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(early_target(&none), None);
    }

    #[test]
    fn text_line() {
        let f = vec![("id".to_string(), "c1".into()), ("n".to_string(), 3.into())];
        assert_eq!(
            render(Format::Text, "info", "hi", &f, "T"),
            "T info  hi id=c1 n=3"
        );
    }
}
