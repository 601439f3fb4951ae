//! Copying a version directory from storage into a local directory, for workers: the
//! copy is assembled beside its destination and renamed into place, so a reader never
//! sees a partial one. Local files are confined to the caller's roots: `object_store`
//! follows symlinks when it lists a directory, so each listed file is resolved and one
//! that leads out of the roots fails the fetch before anything is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStoreExt};
use tokio::io::AsyncWriteExt;

use super::{StorageLocation, list_recursive};
use crate::error::DiscoveryError;

/// Copies every file under the version directory `path_url` (a URL from
/// [`StorageLocation::version_url`], or a plain path) into `dest_dir`, keeping
/// subdirectories. The copy is assembled in a hidden sibling directory and renamed into
/// place at the end, so `dest_dir` either does not exist or is complete; an existing
/// `dest_dir` is replaced. A version directory with no files is an error, so a mistyped
/// URL never yields an empty "complete" copy.
///
/// A local file (symlinks resolved) must lie strictly under one of `local_roots`
/// (directories given by their real paths); one that does not fails the whole fetch
/// before any file is read, and the files are read by their real paths. With no
/// `local_roots`, no local version can be fetched. Object stores have no symlinks, so
/// `local_roots` does not matter for them. A file out of the roots is
/// [`DiscoveryError::OutsideRoots`].
pub async fn fetch_version(
    path_url: &str,
    dest_dir: &Path,
    local_roots: &[PathBuf],
) -> Result<(), DiscoveryError> {
    let location = StorageLocation::open(path_url)?;
    let fetch_error = |reason: &str| DiscoveryError::Fetch {
        location: location.url.clone(),
        reason: reason.to_string(),
    };
    let mut files = list_recursive(&location.store, &location.prefix, &location.url).await?;
    if files.is_empty() {
        return Err(fetch_error("it holds no files"));
    }
    if location.url.starts_with("file:") {
        confine(&mut files, local_roots, &location.url).await?;
    }
    let (Some(parent), Some(name)) = (dest_dir.parent(), dest_dir.file_name()) else {
        return Err(DiscoveryError::io(
            dest_dir,
            std::io::Error::other("the destination needs a parent directory"),
        ));
    };
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(|e| DiscoveryError::io(parent, e))?;
    // Unique per process and call, so two fetches of one version never share a staging dir.
    static FETCHES: AtomicU64 = AtomicU64::new(0);
    let staging = parent.join(format!(
        ".{}.partial-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        FETCHES.fetch_add(1, Ordering::Relaxed)
    ));
    let copied = copy_all(&location, &files, &staging).await;
    let placed = match copied {
        Ok(()) => place(&staging, dest_dir).await,
        Err(e) => Err(e),
    };
    if placed.is_err() {
        let _ = tokio::fs::remove_dir_all(&staging).await;
    }
    placed
}

/// Points every listed local file at its real path, after checking that path is strictly
/// under one of `roots`.
async fn confine(
    files: &mut BTreeMap<String, ObjectMeta>,
    roots: &[PathBuf],
    url: &str,
) -> Result<(), DiscoveryError> {
    let local = LocalFileSystem::new();
    for (relative, meta) in files.iter_mut() {
        let file_url = format!("{url}/{relative}");
        let unusable = |reason: String| DiscoveryError::Fetch {
            location: file_url.clone(),
            reason,
        };
        let listed = local
            .path_to_filesystem(&meta.location)
            .map_err(|e| unusable(e.to_string()))?;
        let real = tokio::fs::canonicalize(&listed)
            .await
            .map_err(|e| unusable(format!("cannot resolve {}: {e}", listed.display())))?;
        if !roots.iter().any(|r| real != *r && real.starts_with(r)) {
            let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            return Err(DiscoveryError::OutsideRoots {
                location: file_url,
                reason: format!(
                    "it resolves to {}, outside the storage roots ({}); a symlink out of them is not followed",
                    real.display(),
                    if roots.is_empty() {
                        "none".to_string()
                    } else {
                        roots.join(", ")
                    }
                ),
            });
        }
        meta.location =
            ObjectPath::from_absolute_path(&real).map_err(|e| unusable(e.to_string()))?;
    }
    Ok(())
}

async fn copy_all(
    location: &StorageLocation,
    files: &BTreeMap<String, ObjectMeta>,
    staging: &Path,
) -> Result<(), DiscoveryError> {
    for (relative, meta) in files {
        let target = relative
            .split('/')
            .fold(staging.to_path_buf(), |p, part| p.join(part));
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| DiscoveryError::io(dir, e))?;
        }
        let url = format!("{}/{relative}", location.url);
        let got = location
            .store
            .get(&meta.location)
            .await
            .map_err(|e| DiscoveryError::storage(&url, e))?;
        let mut stream = got.into_stream();
        let mut file = tokio::fs::File::create(&target)
            .await
            .map_err(|e| DiscoveryError::io(&target, e))?;
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| DiscoveryError::storage(&url, e))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| DiscoveryError::io(&target, e))?;
            written += chunk.len() as u64;
        }
        // Durable before the rename publishes it, so a crash never leaves a torn copy.
        file.sync_all()
            .await
            .map_err(|e| DiscoveryError::io(&target, e))?;
        if written != meta.size {
            return Err(DiscoveryError::Fetch {
                location: url,
                reason: format!(
                    "it was {} bytes when listed but {written} bytes were read; it changed during the copy",
                    meta.size
                ),
            });
        }
    }
    Ok(())
}

async fn place(staging: &Path, dest_dir: &Path) -> Result<(), DiscoveryError> {
    match tokio::fs::remove_dir_all(dest_dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DiscoveryError::io(dest_dir, e)),
    }
    tokio::fs::rename(staging, dest_dir)
        .await
        .map_err(|e| DiscoveryError::io(dest_dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takes_plain_paths_and_leaves_nothing_behind_on_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src/1");
        std::fs::create_dir_all(src.join("empty_subdir")).unwrap();
        let cache = tmp.path().join("cache");
        let roots = [std::fs::canonicalize(tmp.path()).unwrap()];
        let err = fetch_version(src.to_str().unwrap(), &cache.join("1"), &roots)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no files"), "{err}");
        assert!(
            !cache.exists(),
            "a failed fetch created {}",
            cache.display()
        );

        std::fs::write(src.join("model.pt"), b"w").unwrap();
        fetch_version(src.to_str().unwrap(), &cache.join("1"), &roots)
            .await
            .unwrap();
        assert_eq!(std::fs::read(cache.join("1/model.pt")).unwrap(), b"w");
        let entries: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["1"]);
    }

    /// A root holding the version directory `m/1`, and a secret beside the root.
    fn version_with(tmp: &Path) -> (PathBuf, PathBuf) {
        let root = tmp.join("root");
        let version = root.join("m/1");
        std::fs::create_dir_all(&version).unwrap();
        std::fs::write(version.join("model.pt"), b"weights").unwrap();
        let secret = tmp.join("outside/secret.txt");
        std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
        std::fs::write(&secret, b"not for copying").unwrap();
        (root, version)
    }

    #[tokio::test]
    async fn a_symlink_out_of_the_roots_fails_the_fetch_and_copies_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, version) = version_with(tmp.path());
        let roots = [std::fs::canonicalize(&root).unwrap()];
        std::os::unix::fs::symlink(tmp.path().join("outside/secret.txt"), version.join("extra"))
            .unwrap();
        let dest = tmp.path().join("cache/m/1");
        let err = fetch_version(version.to_str().unwrap(), &dest, &roots)
            .await
            .unwrap_err();
        assert!(
            matches!(err, DiscoveryError::OutsideRoots { .. }),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(
            err.contains("/extra")
                && err.contains("secret.txt")
                && err.contains("outside the storage roots"),
            "{err}"
        );
        assert!(!tmp.path().join("cache").exists(), "something was copied");

        // A symlinked directory out of the roots is refused the same way.
        std::fs::remove_file(version.join("extra")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), version.join("assets")).unwrap();
        let err = fetch_version(version.to_str().unwrap(), &dest, &roots)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("assets/secret.txt"), "{err}");
        assert!(!dest.exists());

        // With no roots at all, nothing local is fetched.
        std::fs::remove_file(version.join("assets")).unwrap();
        let err = fetch_version(version.to_str().unwrap(), &dest, &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the storage roots (none)"), "{err}");
    }

    #[tokio::test]
    async fn a_symlink_inside_the_roots_is_copied_as_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, version) = version_with(tmp.path());
        std::fs::write(root.join("shared.bin"), b"shared weights").unwrap();
        std::os::unix::fs::symlink(root.join("shared.bin"), version.join("shared.bin")).unwrap();
        let roots = [std::fs::canonicalize(&root).unwrap()];
        let dest = tmp.path().join("cache/m/1");
        fetch_version(&format!("file://{}", version.display()), &dest, &roots)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(dest.join("shared.bin")).unwrap(),
            b"shared weights"
        );
        assert_eq!(std::fs::read(dest.join("model.pt")).unwrap(), b"weights");
        assert!(!dest.join("shared.bin").is_symlink());
    }
}
