//! The server's current TLS config, and the poller that re-reads the SSL config file.
//!
//! The file is read again every [`RELOAD_INTERVAL`] and compared by content, not by
//! modification time: a Kubernetes Secret volume swaps a `..data` symlink, which changes
//! neither the mtime nor the inode of the path the process was given. A new valid file
//! applies to connections accepted from then on (those already open keep their session);
//! an invalid one is logged once and the previous config stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use crate::error::TlsError;
use crate::ssl_config::{load_server_config, server_config_from_bytes};

/// How often the SSL config file is re-read.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// A server's TLS settings: the file they come from and the config new connections get.
/// Clones share the current config.
#[derive(Debug, Clone)]
pub struct ServerTls {
    path: Arc<PathBuf>,
    current: Arc<ArcSwap<ServerConfig>>,
    /// The contents the current config was built from.
    loaded: Arc<Vec<u8>>,
    reload_interval: Duration,
}

impl ServerTls {
    /// Reads and checks the SSL config file at `path`; the error names the file and the
    /// field at fault.
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let (bytes, config) = load_server_config(path)?;
        tracing::info!(file = %path.display(), "TLS on: serving gRPC over TLS only");
        Ok(Self {
            path: Arc::new(path.to_path_buf()),
            current: Arc::new(ArcSwap::new(config)),
            loaded: Arc::new(bytes),
            reload_interval: RELOAD_INTERVAL,
        })
    }

    /// The same settings, re-reading the file every `interval` (tests poll faster).
    pub fn with_reload_interval(mut self, interval: Duration) -> Self {
        self.reload_interval = interval;
        self
    }

    /// The file the settings come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The config a connection accepted now gets.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the file every reload interval until the returned future is dropped.
    pub(crate) async fn poll_file(self) {
        let mut poller = Poller {
            seen: (*self.loaded).clone(),
            read_failing: false,
        };
        let mut ticks = tokio::time::interval(self.reload_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let path = Arc::clone(&self.path);
            let Ok(read) = tokio::task::spawn_blocking(move || std::fs::read(&*path)).await else {
                continue;
            };
            if let Some(config) = poller.check(&self.path, read) {
                self.current.store(config);
            }
        }
    }
}

/// What the poller remembers between reads, so each change is acted on (and each bad
/// file logged) once.
struct Poller {
    /// The last contents read, valid or not.
    seen: Vec<u8>,
    /// The last read failed (logged once until a read succeeds).
    read_failing: bool,
}

impl Poller {
    /// The new config when `read` is new, valid contents.
    fn check(&mut self, path: &Path, read: std::io::Result<Vec<u8>>) -> Option<Arc<ServerConfig>> {
        let bytes = match read {
            Ok(bytes) => {
                self.read_failing = false;
                bytes
            }
            Err(e) => {
                if !self.read_failing {
                    tracing::error!(file = %path.display(), "cannot re-read the SSL config file ({e}); keeping the TLS config in use");
                    self.read_failing = true;
                }
                return None;
            }
        };
        if bytes == self.seen {
            return None;
        }
        let result = server_config_from_bytes(path, &bytes);
        self.seen = bytes;
        match result {
            Ok(config) => {
                tracing::info!(file = %path.display(), "SSL config file changed: new connections use the new certificates");
                Some(Arc::new(config))
            }
            Err(e) => {
                tracing::error!("{e}; keeping the TLS config in use until the file is fixed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestCa, ssl_config_text};

    #[test]
    fn only_new_valid_contents_replace_the_config() {
        let ca = TestCa::new("ca");
        let first = ssl_config_text(&ca.issue(&["a"]), None, false).into_bytes();
        let second = ssl_config_text(&ca.issue(&["b"]), None, false).into_bytes();
        let path = Path::new("/etc/ssl.cfg");
        let mut poller = Poller {
            seen: first.clone(),
            read_failing: false,
        };
        assert!(poller.check(path, Ok(first.clone())).is_none(), "unchanged");
        assert!(
            poller
                .check(path, Err(std::io::ErrorKind::NotFound.into()))
                .is_none()
        );
        assert!(poller.read_failing);
        assert!(
            poller.check(path, Ok(b"server_key: 1".to_vec())).is_none(),
            "invalid"
        );
        assert!(!poller.read_failing);
        assert!(
            poller.check(path, Ok(second.clone())).is_some(),
            "new and valid"
        );
        assert!(poller.check(path, Ok(second)).is_none(), "applied once");
        assert!(poller.check(path, Ok(first)).is_some(), "back to the first");
    }
}
