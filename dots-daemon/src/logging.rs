//! Log output: human-readable lines or JSON objects, filtered by `RUST_LOG`
//! (default `info`): a level (`debug`), targets with levels
//! (`dots_agent=debug,aya=warn`), or both (`warn,dots_agent::nat=trace`).
//! The filter is tracing-subscriber's `Targets`, not its `EnvFilter`: span
//! and field filters are not supported, and leaving out the regex engine
//! they need keeps about 200 kB out of a router's binary.
//!
//! When stderr is the systemd journal (`JOURNAL_STREAM` names stderr's
//! device and inode, see systemd.exec(5)), every line starts with its
//! syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and
//! trace, sd-daemon(3)), so `journalctl -p warning` selects by level; the
//! journal keeps its own timestamps, so the lines carry none.

use std::fmt::{self, Display};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    filter::Targets,
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
    Layer,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event, for log collectors.
    Json,
}

/// Installs the global subscriber, writing to stderr. Safe to call once.
/// A `RUST_LOG` that does not parse is reported on stderr, and `info` is
/// used instead.
pub fn init(format: LogFormat) {
    let filter = match filter_from_env() {
        Ok(filter) => filter,
        Err(bad) => {
            eprintln!("RUST_LOG: {bad}; logging at level info");
            Targets::new().with_default(Level::INFO)
        }
    };
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, never in files or journals.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let journal = stderr_is_journal();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        // A log write that fails (disk full, closed pipe) is dropped: the
        // default reports it with eprintln!, which panics when stderr fails
        // too, and would take the daemon down with it.
        .log_internal_errors(false);
    let layer = match (format, journal) {
        (LogFormat::Human, false) => layer.boxed(),
        (LogFormat::Json, false) => layer.json().flatten_event(true).boxed(),
        (LogFormat::Human, true) => {
            let inner = tracing_subscriber::fmt::format().without_time();
            layer.event_format(Prioritized(inner)).boxed()
        }
        (LogFormat::Json, true) => {
            let inner = tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .without_time();
            layer
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(Prioritized(inner))
                .boxed()
        }
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
}

/// The filter `RUST_LOG` names (see the module's docs), `info` when it is
/// unset or empty; an error names the value that does not parse.
pub fn filter_from_env() -> Result<Targets, String> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => parse_filter(&v),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(Targets::new().with_default(Level::INFO)),
        Err(std::env::VarError::NotUnicode(_)) => Err("not UTF-8".into()),
    }
}

/// Parses a `RUST_LOG` value.
fn parse_filter(value: &str) -> Result<Targets, String> {
    value.trim().parse::<Targets>().map_err(|e| {
        format!("{value:?} is not a filter ({e}); write a level or target=level, comma-separated")
    })
}

/// The syslog priority of a tracing level (RFC 5424 severities).
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` is
/// `DEVICE:INODE` of the stream systemd connected, and a redirection in
/// between (`2>file`) changes stderr's, so it only matches the real thing.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    // fstat on a duplicate of fd 2: closing the duplicate leaves stderr open.
    use std::os::fd::AsFd;
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    journal_stream_matches(&v.to_string_lossy(), meta.dev(), meta.ino())
}

/// `JOURNAL_STREAM` (`DEVICE:INODE`, decimal) against a file's device and inode.
fn journal_stream_matches(var: &str, dev: u64, ino: u64) -> bool {
    var.split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// An event format that puts the syslog priority (`<N>`) before the line
/// the inner format writes.
struct Prioritized<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// A list written as its items separated by `, ` (`192.0.2.0/24,
/// 198.51.100.0/24`), for log fields: `domain = %logging::list(&prefixes)`.
/// An empty list is written `none`.
pub fn list<T: Display>(items: &[T]) -> List<'_, T> {
    List(items)
}

/// See [`list`].
pub struct List<'a, T>(&'a [T]);

impl<T: Display> Display for List<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            item.fmt(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use super::*;

    #[test]
    fn lists_print_as_lists() {
        let p: Vec<ipnet::IpNet> = vec![
            "192.0.2.0/24".parse().unwrap(),
            "198.51.100.0/24".parse().unwrap(),
        ];
        assert_eq!(list(&p).to_string(), "192.0.2.0/24, 198.51.100.0/24");
        assert_eq!(list::<u8>(&[]).to_string(), "none");
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(journal_stream_matches("64769:1234", 64769, 1234));
        assert!(!journal_stream_matches("64769:1234", 64769, 1235));
        assert!(!journal_stream_matches("garbage", 64769, 1234));
        assert!(!journal_stream_matches("", 0, 0));
    }

    #[test]
    fn rust_log_values_parse_or_are_named() {
        let f = parse_filter("warn,dots_agent::nat=trace").unwrap();
        assert!(f.would_enable("dots_agent::nat", &Level::TRACE));
        assert!(!f.would_enable("dots_agent::peer", &Level::INFO));
        assert!(f.would_enable("hickory", &Level::WARN));
        let f = parse_filter(" debug ").unwrap();
        assert!(f.would_enable("anything", &Level::DEBUG));
        assert!(!f.would_enable("anything", &Level::TRACE));
        let e = parse_filter("dots_agent=loud").unwrap_err();
        assert!(e.contains("\"dots_agent=loud\""), "{e}");
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(&Level::ERROR), 3);
        assert_eq!(syslog_priority(&Level::WARN), 4);
        assert_eq!(syslog_priority(&Level::INFO), 6);
        assert_eq!(syslog_priority(&Level::DEBUG), 7);
        assert_eq!(syslog_priority(&Level::TRACE), 7);
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_journal_line_starts_with_its_priority() {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_writer(move || out.clone())
            .with_ansi(false)
            .event_format(Prioritized(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
            tracing::debug!("d");
            tracing::trace!("t");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let prefixes: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>", "<7>"], "{text}");
    }
}
