//! Shell completions and man pages, generated from the clap definitions of
//! the binaries so they never drift from `--help`.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

/// Writes completions for `shell` to stdout.
pub fn completions<C: CommandFactory>(shell: clap_complete::Shell, name: &str) {
    clap_complete::generate(shell, &mut C::command(), name, &mut std::io::stdout());
}

/// Writes `NAME.1` and one page per subcommand (`NAME-SUB.1`) into `dir`.
pub fn man_pages<C: CommandFactory>(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = C::command();
    write_page(&cmd, dir, cmd.get_name())?;
    // Subcommands get the version only when the command is built: give it
    // to their pages here, so that each page's title names it.
    let version: Option<&'static str> = cmd
        .get_version()
        .map(|v| &*Box::leak(v.to_string().into_boxed_str()));
    for sub in cmd.get_subcommands() {
        // clap wants a 'static name for the renamed copy; one per page is fine.
        let name: &'static str =
            Box::leak(format!("{}-{}", cmd.get_name(), sub.get_name()).into_boxed_str());
        let mut page = sub.clone().name(name);
        if page.get_version().is_none() {
            if let Some(v) = version {
                page = page.version(v);
            }
        }
        write_page(&page, dir, name)?;
    }
    Ok(())
}

/// Checks what a binary's packaging relies on: the command calls itself
/// `name`, `--version` prints `NAME VERSION` (the version of the crate that
/// calls this), and the man pages carry it in their titles, for the main
/// page and for the page of subcommand `sub`. For the binaries' tests.
pub fn check_identity<C: CommandFactory + clap::Parser>(
    name: &str,
    version: &str,
    sub: &str,
) -> Result<()> {
    let cmd = C::command();
    anyhow::ensure!(cmd.get_name() == name, "named {:?}", cmd.get_name());
    anyhow::ensure!(
        cmd.get_version() == Some(version),
        "version {:?}",
        cmd.get_version()
    );
    match C::try_parse_from([name, "--version"]) {
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayVersion => {
            let printed = e.to_string();
            anyhow::ensure!(
                printed.trim() == format!("{name} {version}"),
                "--version printed {printed:?}"
            );
        }
        _ => anyhow::bail!("--version did not print the version"),
    }
    let dir = std::env::temp_dir().join(format!("{name}-man-{}", std::process::id()));
    man_pages::<C>(&dir)?;
    for page in [name.to_string(), format!("{name}-{sub}")] {
        let path = dir.join(format!("{page}.1"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(
            text.contains(&format!("\"{page} {version}\"")),
            "{page}.1 does not carry its name and version"
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn write_page(cmd: &clap::Command, dir: &Path, name: &str) -> Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}
