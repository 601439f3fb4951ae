//! The storage roots: the only places a worker loads model versions from.
//!
//! A version's location comes from the registry (`AvailableVersion.path`), which anyone
//! who can write etcd can change. The roots come from the worker's own flags
//! (`--storage-root`, or the model base paths in `aspire-server`), never from the
//! registry, and [`StorageRoots::check`] refuses, before anything is fetched, every
//! location that is not a plain path strictly under one of them:
//!
//! - a location is an absolute path or a `file://`, `s3://`, `gs://`, `az://` or
//!   `abfs://` URL, with no query, fragment, backslash or control character;
//! - no segment is empty, `.` or `..`, written plainly or percent-encoded, and no
//!   segment hides a `/` as `%2F`;
//! - it has the scheme and bucket of a root and continues the root's path segment by
//!   segment (`/models-evil` is not under `/models`), with at least one more segment;
//! - a local location's real path (symlinks resolved) is under a root's real path.
//!
//! Parsing and comparing are pure functions; only [`StorageRoots::check`] touches the
//! filesystem, to resolve symlinks. Files inside a version directory are confined to the
//! same real roots while they are copied (`aspire_discovery::fetch_version`).

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// The URL schemes a root or a location may use; plain paths are `file`.
const SCHEMES: [&str; 5] = ["file", "s3", "gs", "az", "abfs"];

/// A place in storage, split into what is compared: scheme, bucket and path segments
/// (percent-decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    /// `file` for local paths.
    scheme: String,
    /// The bucket or container (with the account for `abfs://`); empty for `file`.
    authority: String,
    /// The path's segments, decoded; none empty, `.` or `..`.
    segments: Vec<String>,
}

impl Place {
    fn is_local(&self) -> bool {
        self.scheme == "file"
    }

    /// The local path; only for `file` places.
    fn local_path(&self) -> PathBuf {
        self.segments
            .iter()
            .fold(PathBuf::from("/"), |p, s| p.join(s))
    }

    /// Whether `self` is strictly under `root`, segment by segment.
    fn is_under(&self, root: &Place) -> bool {
        self.scheme == root.scheme
            && self.authority == root.authority
            && self.segments.len() > root.segments.len()
            && self.segments.starts_with(&root.segments)
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)?;
        if self.segments.is_empty() {
            return f.write_str("/");
        }
        for s in &self.segments {
            write!(f, "/{s}")?;
        }
        Ok(())
    }
}

/// The roots a worker may load versions from. Empty roots allow nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageRoots {
    roots: Vec<Place>,
}

/// Why a location was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    /// The location is not allowed; a new attempt with the same location would be
    /// refused again. The phrase follows the location ("is outside the storage roots").
    #[error("{0}")]
    Refused(String),
    /// A local location could not be resolved (it does not exist, or cannot be read):
    /// like a failed fetch, worth retrying later.
    #[error("{0}")]
    Unresolvable(String),
}

/// A location that passed [`StorageRoots::check`]: what to fetch, and where its local
/// files may resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedLocation {
    /// What to hand to the fetch: the real path for a local location (so what is
    /// fetched is what was checked), the location as given for a bucket.
    pub fetch_from: String,
    /// The roots' real paths: every file copied from a local location must resolve
    /// inside one of them (symlinks out of the roots are not followed).
    pub local_roots: Vec<PathBuf>,
}

impl StorageRoots {
    /// Parses roots as the operator gave them: directories (relative ones against the
    /// current directory), `file://` URLs or bucket URLs (`s3://bucket/prefix`, `gs://`,
    /// `az://`, `abfs://`). `flag` names where they came from, for the error.
    pub fn parse<S: AsRef<str>>(values: &[S], flag: &str) -> Result<Self, String> {
        let mut roots: Vec<Place> = Vec::new();
        for value in values {
            let value = value.as_ref();
            let root = parse_root(value).map_err(|why| format!("{flag} {value:?}: {why}"))?;
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        Ok(Self { roots })
    }

    /// These roots and `other`'s.
    pub fn union(mut self, other: StorageRoots) -> Self {
        for root in other.roots {
            if !self.roots.contains(&root) {
                self.roots.push(root);
            }
        }
        self
    }

    /// True when there is no root (then every location is refused).
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The roots as URLs, comma-separated, for messages.
    pub fn describe(&self) -> String {
        if self.roots.is_empty() {
            return "none".to_string();
        }
        let list: Vec<String> = self.roots.iter().map(ToString::to_string).collect();
        list.join(", ")
    }

    /// Checks `location` against the roots, resolving symlinks of local locations with
    /// the filesystem. See the module documentation for the rules.
    pub fn check(&self, location: &str) -> Result<CheckedLocation, LocationError> {
        self.check_with(location, |p| std::fs::canonicalize(p))
    }

    /// [`Self::check`] with `resolve` in place of `std::fs::canonicalize`.
    pub fn check_with(
        &self,
        location: &str,
        resolve: impl Fn(&Path) -> std::io::Result<PathBuf>,
    ) -> Result<CheckedLocation, LocationError> {
        let place = parse_location(location).map_err(LocationError::Refused)?;
        self.check_lexically(&place)?;
        if !place.is_local() {
            return Ok(CheckedLocation {
                fetch_from: location.to_string(),
                local_roots: Vec::new(),
            });
        }
        let path = place.local_path();
        let real = resolve(&path).map_err(|e| {
            LocationError::Unresolvable(format!("cannot be resolved on this worker ({e})"))
        })?;
        let local_roots: Vec<PathBuf> = self
            .roots
            .iter()
            .filter(|r| r.is_local())
            // A root that does not exist holds nothing.
            .filter_map(|r| resolve(&r.local_path()).ok())
            .collect();
        if !local_roots.iter().any(|r| strictly_under(&real, r)) {
            return Err(LocationError::Refused(format!(
                "resolves to {} (through a symlink), outside the storage roots (--storage-root {})",
                real.display(),
                self.describe()
            )));
        }
        let fetch_from = real
            .to_str()
            .ok_or_else(|| {
                LocationError::Refused(format!(
                    "resolves to {}, which is not UTF-8",
                    real.display()
                ))
            })?
            .to_string();
        Ok(CheckedLocation {
            fetch_from,
            local_roots,
        })
    }

    /// The pure part of the check: `place` is strictly under a root.
    fn check_lexically(&self, place: &Place) -> Result<(), LocationError> {
        if self.roots.iter().any(|root| place.is_under(root)) {
            Ok(())
        } else {
            Err(LocationError::Refused(format!(
                "is outside the storage roots (--storage-root {})",
                self.describe()
            )))
        }
    }
}

/// Whether `path` is below `root`, by whole components, and not `root` itself.
pub fn strictly_under(path: &Path, root: &Path) -> bool {
    path != root && path.starts_with(root)
}

/// Parses a root given by the operator: trusted, so `..` in a local path is resolved
/// lexically (as discovery does with base paths) rather than refused.
fn parse_root(value: &str) -> Result<Place, String> {
    const FORMS: &str =
        "use a directory or a file://, s3://bucket/prefix, gs://, az:// or abfs:// URL";
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("a storage root cannot be empty; {FORMS}"));
    }
    if !value.contains("://") && !value.starts_with("file:") {
        let absolute =
            std::path::absolute(value).map_err(|e| format!("cannot make it absolute ({e})"))?;
        return local_place(&absolute);
    }
    let url = url::Url::parse(value).map_err(|e| format!("not a valid URL ({e}); {FORMS}"))?;
    if !SCHEMES.contains(&url.scheme()) {
        return Err(format!("unsupported scheme '{}'; {FORMS}", url.scheme()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a storage root has no query or fragment".to_string());
    }
    if url.scheme() == "file" {
        let path = url
            .to_file_path()
            .map_err(|()| "a file URL must name no host, e.g. file:///models".to_string())?;
        return local_place(&path);
    }
    let authority = url.authority().to_string();
    if authority.is_empty() {
        return Err(format!(
            "it names no bucket or container, e.g. {}://bucket/models",
            url.scheme()
        ));
    }
    let segments = url
        .path_segments()
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let decoded = percent_decode(s)?;
            if decoded == "." || decoded == ".." {
                return Err(format!("the segment {s:?} is a dot segment"));
            }
            Ok(decoded)
        })
        .collect::<Result<_, String>>()?;
    Ok(Place {
        scheme: url.scheme().to_string(),
        authority,
        segments,
    })
}

/// A local directory as a place, `..` resolved lexically.
fn local_place(path: &Path) -> Result<Place, String> {
    let mut segments: Vec<String> = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                segments.pop();
            }
            Component::Normal(s) => segments.push(
                s.to_str()
                    .ok_or_else(|| format!("{} is not UTF-8", path.display()))?
                    .to_string(),
            ),
            Component::Prefix(_) => return Err("not a Unix path".to_string()),
        }
    }
    Ok(Place {
        scheme: "file".to_string(),
        authority: String::new(),
        segments,
    })
}

/// Parses a location from the registry: untrusted, so anything unusual is refused rather
/// than normalized. The error is a phrase that follows the location.
fn parse_location(location: &str) -> Result<Place, String> {
    const FORMS: &str =
        "a location is an absolute path or a file:///, s3://, gs://, az:// or abfs:// URL";
    if let Some(c) = location
        .chars()
        .find(|c| c.is_control() || matches!(c, '\\' | '?' | '#'))
    {
        return Err(format!(
            "contains {c:?}; {FORMS} without queries, fragments, backslashes or control characters"
        ));
    }
    if location.trim() != location {
        return Err("starts or ends with white space".to_string());
    }
    if let Some(path) = location.strip_prefix('/') {
        // A plain path: its segments are names as written (no percent-decoding).
        let segments = path_segments(path, false)?;
        return Ok(Place {
            scheme: "file".to_string(),
            authority: String::new(),
            segments,
        });
    }
    let Some((scheme, rest)) = location.split_once("://") else {
        return Err(format!("is neither an absolute path nor a URL; {FORMS}"));
    };
    let scheme = scheme.to_ascii_lowercase();
    if !SCHEMES.contains(&scheme.as_str()) {
        return Err(format!("uses the scheme '{scheme}'; {FORMS}"));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if scheme == "file" && !authority.is_empty() {
        return Err("is a file URL with a host; write file:///path".to_string());
    }
    if scheme != "file" && authority.is_empty() {
        return Err(format!("names no bucket or container; {FORMS}"));
    }
    if authority.contains('%') {
        return Err("has a percent-encoded bucket name".to_string());
    }
    let Some(path) = path.strip_prefix('/') else {
        return Err("names no path under a storage root".to_string());
    };
    let segments = path_segments(path, true)?;
    let place = Place {
        scheme,
        authority: authority.to_string(),
        segments,
    };
    same_as_url_parser(location, &place)?;
    Ok(place)
}

/// Splits a path (after its leading `/`) into segments, refusing empty and dot ones and,
/// when `decode`, percent-decoding each (and refusing a `/` hidden in one).
fn path_segments(path: &str, decode: bool) -> Result<Vec<String>, String> {
    path.split('/')
        .map(|raw| {
            if raw.is_empty() {
                return Err("has an empty segment ('//' or a trailing '/')".to_string());
            }
            // Plain paths are not decoded, but a name that decodes to a dot segment is
            // refused there too: some layer might decode it.
            let decoded = percent_decode(raw).unwrap_or_else(|_| raw.to_string());
            for name in [raw, decoded.as_str()] {
                if name == "." || name == ".." {
                    return Err(format!("has the dot segment {raw:?}"));
                }
            }
            if !decode {
                return Ok(raw.to_string());
            }
            let decoded = percent_decode(raw).map_err(|why| format!("segment {raw:?}: {why}"))?;
            if decoded.contains(['/', '\\']) || decoded.chars().any(char::is_control) {
                return Err(format!(
                    "has the segment {raw:?}, which hides a slash, backslash or control character"
                ));
            }
            Ok(decoded)
        })
        .collect()
}

/// Refuses a location that the `url` crate (which the fetch uses) would read as another
/// place than [`parse_location`] did: one parser's view must not differ from the other's.
fn same_as_url_parser(location: &str, place: &Place) -> Result<(), String> {
    let differs =
        || "does not read the same to every URL parser; write it in normal form".to_string();
    let url = url::Url::parse(location).map_err(|e| format!("is not a valid URL ({e})"))?;
    if url.scheme() != place.scheme || url.query().is_some() || url.fragment().is_some() {
        return Err(differs());
    }
    if place.is_local() {
        return match url.to_file_path() {
            Ok(path) if path == place.local_path() => Ok(()),
            _ => Err(differs()),
        };
    }
    let segments: Option<Vec<String>> = url
        .path_segments()
        .map(|parts| parts.map(|p| percent_decode(p).ok()).collect())
        .and_then(|v: Vec<Option<String>>| v.into_iter().collect());
    if url.authority() != place.authority || segments.as_ref() != Some(&place.segments) {
        return Err(differs());
    }
    Ok(())
}

/// Decodes `%XX` escapes strictly: a `%` not followed by two hex digits, or bytes that
/// are not UTF-8, are errors.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a '%' is not followed by two hex digits".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-escapes that are not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(values: &[&str]) -> StorageRoots {
        StorageRoots::parse(values, "--storage-root").unwrap()
    }

    /// Resolves nothing: every path is its own real path (no symlinks).
    fn as_is(p: &Path) -> std::io::Result<PathBuf> {
        Ok(p.to_path_buf())
    }

    fn refused(roots: &StorageRoots, location: &str) -> String {
        match roots.check_with(location, as_is) {
            Err(LocationError::Refused(why)) => why,
            other => panic!("{location:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn roots_parse_from_paths_and_urls() {
        let r = roots(&[
            "/models/",
            "file:///data/m",
            "s3://bucket/pre/fix",
            "gs://b",
        ]);
        assert_eq!(
            r.describe(),
            "file:///models, file:///data/m, s3://bucket/pre/fix, gs://b/"
        );
        let relative = roots(&["models/x/../mnist"]);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            relative.describe(),
            format!("file://{}", cwd.join("models/mnist").display())
        );
        assert!(roots(&[]).is_empty());
        assert_eq!(
            roots(&["/a", "file:///a"]).roots.len(),
            1,
            "duplicates kept"
        );
    }

    #[test]
    fn bad_roots_are_refused_naming_the_flag() {
        for (bad, needle) in [
            ("http://host/m", "unsupported scheme 'http'"),
            ("s3://", "names no bucket"),
            ("file://host/m", "must name no host"),
            ("", "cannot be empty"),
            ("s3://b/m?x=1", "no query"),
            ("s3 ://x", "not a valid URL"),
        ] {
            let err = StorageRoots::parse(&[bad], "--storage-root").unwrap_err();
            assert!(
                err.contains("--storage-root") && err.contains(needle),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn locations_strictly_under_a_root_pass() {
        let r = roots(&["/models", "s3://bucket/pre", "az://container/m"]);
        for ok in [
            "file:///models/mnist/3",
            "/models/mnist/3",
            "file:///models/with%20space/1",
            "s3://bucket/pre/mnist/007",
            "S3://bucket/pre/mnist/1",
            "az://container/m/x/1",
        ] {
            let checked = r
                .check_with(ok, as_is)
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
            if ok.contains("models") {
                assert!(checked.fetch_from.starts_with("/models/"), "{checked:?}");
                assert_eq!(checked.local_roots, vec![PathBuf::from("/models")]);
            } else {
                assert_eq!(checked.fetch_from, ok);
            }
        }
        let checked = r
            .check_with("file:///models/with%20space/1", as_is)
            .unwrap();
        assert_eq!(checked.fetch_from, "/models/with space/1");
    }

    #[test]
    fn locations_outside_the_roots_are_refused() {
        let r = roots(&["/models", "s3://bucket/pre"]);
        for bad in [
            "file:///etc/x",
            "file:///models",
            "file:///models-evil/1",
            "/models-evil/1",
            "/modelsx",
            "s3://bucket/pre",
            "s3://bucket/prefix/1",
            "s3://other/pre/1",
            "gs://bucket/pre/1",
            "file:///bucket/pre/1",
        ] {
            let why = refused(&r, bad);
            assert!(
                why.contains("outside the storage roots")
                    && why.contains("--storage-root file:///models, s3://bucket/pre"),
                "{bad}: {why}"
            );
        }
        let none = StorageRoots::default();
        assert!(refused(&none, "file:///models/1").contains("(--storage-root none)"));
    }

    #[test]
    fn dot_and_empty_segments_are_refused_however_written() {
        let r = roots(&["/models", "s3://bucket/pre"]);
        for bad in [
            "file:///models/../etc/x",
            "file:///models/./mnist/1",
            "file:///models/%2e%2e/etc",
            "file:///models/%2E%2e/etc",
            "file:///models/.%2e/etc",
            "file:///models/%2e/m/1",
            "/models/../etc/x",
            "/models/%2e%2e/etc",
            "s3://bucket/pre/../x/1",
            "s3://bucket/pre/%2E%2E/x/1",
            "/models/mnist/1/..",
        ] {
            assert!(refused(&r, bad).contains("dot segment"), "{bad}");
        }
        for bad in [
            "file:///models//mnist/1",
            "file:///models/mnist/1/",
            "/models/mnist//1",
            "s3://bucket/pre//1",
            "file:////models/mnist/1",
        ] {
            assert!(refused(&r, bad).contains("empty segment"), "{bad}");
        }
    }

    #[test]
    fn other_schemes_and_odd_forms_are_refused() {
        let r = roots(&["/models", "s3://bucket/pre"]);
        for (bad, needle) in [
            ("http://bucket/pre/1", "scheme 'http'"),
            ("https://bucket.s3.amazonaws.com/pre/1", "scheme 'https'"),
            ("memory:///models/1", "scheme 'memory'"),
            ("models/mnist/1", "neither an absolute path nor a URL"),
            ("file:/models/mnist/1", "neither an absolute path nor a URL"),
            ("file://host/models/1", "with a host"),
            ("file://localhost/models/1", "with a host"),
            ("s3:///pre/1", "names no bucket"),
            ("s3://bucket", "names no path"),
            ("s3://b%75cket/pre/1", "percent-encoded bucket"),
            ("file:///models/1?x", "'?'"),
            ("file:///models/1#x", "'#'"),
            ("file:///models\\..\\etc", "'\\\\'"),
            ("file:///models/1\n", "'\\n'"),
            (" file:///models/1", "white space"),
            ("file:///models/a%2Fb/1", "hides a slash"),
            ("file:///models/a%5c..%5cb/1", "hides a slash"),
            ("file:///models/a%00/1", "control character"),
            ("file:///models/%zz/1", "two hex digits"),
            ("file:///models/%ff/1", "not UTF-8"),
        ] {
            let why = refused(&r, bad);
            assert!(why.contains(needle), "{bad}: {why}");
        }
    }

    #[test]
    fn a_url_the_url_crate_reads_differently_is_refused() {
        let r = roots(&["s3://bucket/pre", "/models"]);
        // A raw space in a path: the url crate encodes it, and both readings decode to
        // the same segments; accepted.
        assert!(r.check_with("s3://bucket/pre/a b/1", as_is).is_ok());
        // A bucket name the url crate (which the fetch uses) cannot read is refused.
        for bad in [
            "s3://buc ket/pre/1",
            "s3://bucket:99999/pre/1",
            "s3://b[ad/pre/1",
        ] {
            let why = refused(&r, bad);
            assert!(why.contains("is not a valid URL"), "{bad}: {why}");
        }
    }

    #[test]
    fn symlinks_out_of_the_roots_are_refused() {
        let r = roots(&["/models"]);
        // /models/mnist/3 is a symlink to /etc/secrets.
        let resolve = |p: &Path| -> std::io::Result<PathBuf> {
            Ok(match p.to_str() {
                Some("/models/mnist/3") => PathBuf::from("/etc/secrets"),
                Some("/models/mnist/4") => PathBuf::from("/models/shared/4"),
                _ => p.to_path_buf(),
            })
        };
        let why = match r.check_with("file:///models/mnist/3", resolve) {
            Err(LocationError::Refused(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(why.contains("resolves to /etc/secrets"), "{why}");
        // A symlink that stays inside the roots is followed, and fetched by its real path.
        let ok = r.check_with("file:///models/mnist/4", resolve).unwrap();
        assert_eq!(ok.fetch_from, "/models/shared/4");
        // A root that is itself a symlink is compared by its real path.
        let moved = |p: &Path| -> std::io::Result<PathBuf> {
            Ok(PathBuf::from("/real").join(p.strip_prefix("/").unwrap()))
        };
        let ok = r.check_with("/models/mnist/1", moved).unwrap();
        assert_eq!(ok.local_roots, vec![PathBuf::from("/real/models")]);
    }

    #[test]
    fn an_unresolvable_location_is_not_a_refusal() {
        let r = roots(&["/models"]);
        let missing = |_: &Path| -> std::io::Result<PathBuf> {
            Err(std::io::Error::from(std::io::ErrorKind::NotFound))
        };
        assert!(matches!(
            r.check_with("/models/mnist/1", missing),
            Err(LocationError::Unresolvable(_))
        ));
    }

    #[test]
    fn the_real_filesystem_resolves_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("models");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("m/1")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("m/2")).unwrap();
        let r = StorageRoots::parse(&[root.to_str().unwrap()], "--storage-root").unwrap();
        let inside = format!("file://{}/m/1", root.display());
        let checked = r.check(&inside).unwrap();
        assert_eq!(
            checked.local_roots,
            vec![std::fs::canonicalize(&root).unwrap()]
        );
        let why = match r.check(&format!("{}/m/2", root.display())) {
            Err(LocationError::Refused(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(why.contains("through a symlink"), "{why}");
        assert!(matches!(
            r.check(&format!("{}/m/3", root.display())),
            Err(LocationError::Unresolvable(_))
        ));
    }

    #[test]
    fn strictly_under_compares_whole_components() {
        assert!(strictly_under(Path::new("/a/b"), Path::new("/a")));
        assert!(!strictly_under(Path::new("/a"), Path::new("/a")));
        assert!(!strictly_under(Path::new("/ab"), Path::new("/a")));
    }

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(percent_decode("a%20b%2E").unwrap(), "a b.");
        assert!(percent_decode("%2").is_err());
        assert!(percent_decode("%g0").is_err());
        assert!(percent_decode("%c3").is_err());
        assert_eq!(percent_decode("%c3%a9").unwrap(), "é");
    }
}
