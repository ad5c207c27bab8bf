//! Exit statuses of both daemons, after sysexits.h: 0 done, 1 failed, and
//! 78 (`EX_CONFIG`) when the configuration is wrong (a file, the flags, a
//! failing `check-config`), so that a unit with
//! `RestartPreventExitStatus=78` does not restart into the same error.

use crate::config::ConfigError;

/// `EX_CONFIG` of sysexits.h.
pub const EX_CONFIG: i32 = 78;

/// A configuration problem found outside a file's own checks (flags that
/// contradict each other, a certificate that cannot be used, ...): exits
/// with [`EX_CONFIG`], as a [`ConfigError`] does.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigProblem(pub String);

/// The exit status for `e`: [`EX_CONFIG`] when a [`ConfigError`] or a
/// [`ConfigProblem`] is anywhere in its chain, else 1.
pub fn status(e: &anyhow::Error) -> i32 {
    if e.chain()
        .any(|c| c.is::<ConfigError>() || c.is::<ConfigProblem>())
    {
        EX_CONFIG
    } else {
        1
    }
}

/// Parses the command line. `--help` and `--version` print and exit 0;
/// a bad flag prints clap's message and exits with [`EX_CONFIG`]: for a
/// service, flags are configuration.
pub fn parse_args<P: clap::Parser>() -> P {
    P::try_parse().unwrap_or_else(|e| exit_for_clap(&e))
}

fn clap_status(e: &clap::Error) -> i32 {
    if e.use_stderr() {
        EX_CONFIG
    } else {
        0
    }
}

fn exit_for_clap(e: &clap::Error) -> ! {
    let _ = e.print();
    std::process::exit(clap_status(e))
}

/// Prints `e` as `NAME: error: cause: cause` on stderr and exits with its
/// [`status`].
pub fn fail(name: &str, e: &anyhow::Error) -> ! {
    eprintln!("{name}: {e:#}");
    std::process::exit(status(e))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use anyhow::Context;
    use clap::Parser;

    use super::*;

    #[test]
    fn configuration_errors_exit_78_anywhere_in_the_chain() {
        let file = ConfigError::Missing {
            file: PathBuf::from("a.toml"),
            key: "peers".into(),
            message: "no peer".into(),
        };
        let e = anyhow::Error::new(file).context("loading");
        assert_eq!(status(&e), EX_CONFIG);
        let e = Err::<(), _>(ConfigProblem("bad".into()))
            .context("starting")
            .unwrap_err();
        assert_eq!(status(&e), EX_CONFIG);
        assert_eq!(status(&anyhow::anyhow!("socket in use")), 1);
    }

    #[derive(Parser, Debug)]
    #[command(name = "t", version = "1")]
    struct Args {
        #[arg(long)]
        n: u8,
    }

    #[test]
    fn bad_flags_exit_78_help_exits_0() {
        let e = Args::try_parse_from(["t", "--n", "x"]).unwrap_err();
        assert_eq!(clap_status(&e), EX_CONFIG);
        let e = Args::try_parse_from(["t", "--bogus"]).unwrap_err();
        assert_eq!(clap_status(&e), EX_CONFIG);
        let e = Args::try_parse_from(["t", "--help"]).unwrap_err();
        assert_eq!(clap_status(&e), 0);
        let e = Args::try_parse_from(["t", "--version"]).unwrap_err();
        assert_eq!(clap_status(&e), 0);
    }
}
