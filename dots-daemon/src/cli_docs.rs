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

fn write_page(cmd: &clap::Command, dir: &Path, name: &str) -> Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}
