//! The local control sockets of both daemons: Unix sockets, mode 0600, one
//! JSON object per line (a request, then one or more replies).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    net::{unix::OwnedReadHalf, UnixListener, UnixStream},
};

/// Binds `path` for the owner only. A stale socket of an earlier run is
/// replaced; a live one (something answers) is an error naming `who`.
pub fn bind(path: &Path, who: &str) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another {who}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Sends `req` to the daemon `who` at `socket`; returns the reply lines.
pub async fn request(
    socket: &Path,
    who: &str,
    req: &impl Serialize,
) -> Result<Lines<BufReader<OwnedReadHalf>>> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {} (is `{who}` running?)", socket.display()))?;
    let (read, mut write) = stream.into_split();
    write_line(&mut write, req).await?;
    Ok(BufReader::new(read).lines())
}

/// Writes one JSON line.
pub async fn write_line(
    w: &mut (impl AsyncWriteExt + Unpin),
    value: &impl Serialize,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(value).map_err(std::io::Error::other)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

/// Parses one reply line.
pub fn parse<T: DeserializeOwned>(line: &str) -> Result<T> {
    serde_json::from_str(line).with_context(|| format!("bad reply line {line:?}"))
}
