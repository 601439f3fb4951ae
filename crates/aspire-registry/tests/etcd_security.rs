//! The etcd registry against a real etcd with TLS (a server certificate from a CA made
//! here, client certificates demanded) and with authentication on: TLS put/get/watch,
//! clients refused for the wrong CA or no certificate, users refused for a wrong
//! password, the role recipe of `scripts/etcd-roles.sh` keeping a worker off a model's
//! pin, tokens renewed after they expire or vanish with a restart, and the conformance
//! suite over TLS with a user.
//!
//! Registries connect through [`EtcdArgs`], the flags every binary takes, so the files
//! are read and checked as in production.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aspire_core::{AspiredVersions, AvailableVersions, ModelName, WorkerRecord};
use aspire_registry::cli::EtcdArgs;
use aspire_registry::conformance::{self, wait_for};
use aspire_registry::etcd_server::{EtcdServer, EtcdServerOptions, EtcdServerTls};
use aspire_registry::{EtcdRegistry, Registry, RegistryError};
use clap::Parser;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const ROOT_PASSWORD: &str = "root-pw";

/// A CA and the certificates it issued, as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed CA");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write CA");
        Self {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate for `common_name` (etcd's user when a request has no token)
    /// naming 127.0.0.1; returns its certificate and key files.
    fn issue(&self, common_name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        // etcd also dials itself (its HTTP gateway) with its server certificate.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let cert_file = self.dir.path().join(format!("{common_name}.pem"));
        let key_file = self.dir.path().join(format!("{common_name}-key.pem"));
        std::fs::write(&cert_file, cert.pem()).expect("write cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        (cert_file, key_file)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }
}

/// etcd with TLS on its client port, demanding client certificates from `pki`'s CA.
fn tls_etcd(pki: &Pki, extra_args: &[&str]) -> EtcdServer {
    let (cert_file, key_file) = pki.issue("etcd-server");
    EtcdServer::start_with(EtcdServerOptions {
        tls: Some(EtcdServerTls {
            cert_file,
            key_file,
            trusted_ca_file: pki.ca_file(),
            client_cert_auth: true,
        }),
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// The flags a binary would get: endpoint, prefix, then `extra`.
fn args(server: &EtcdServer, prefix: &str, extra: &[String]) -> EtcdArgs {
    let argv = [
        "test".to_string(),
        format!("--etcd-endpoints={}", server.endpoint()),
        format!("--prefix={prefix}"),
    ]
    .into_iter()
    .chain(extra.iter().cloned());
    Cli::try_parse_from(argv).expect("flags parse").etcd
}

/// TLS flags with a client certificate for `common_name`.
fn tls_flags(pki: &Pki, common_name: &str) -> Vec<String> {
    let (cert, key) = pki.issue(common_name);
    vec![
        format!("--etcd-ca-file={}", pki.ca_file().display()),
        format!("--etcd-cert-file={}", cert.display()),
        format!("--etcd-key-file={}", key.display()),
    ]
}

/// TLS flags plus a user whose password is in a file.
fn user_flags(pki: &Pki, user: &str, password: &str) -> Vec<String> {
    let mut flags = tls_flags(pki, user);
    let file = pki.write(&format!("{user}.password"), &format!("{password}\n"));
    flags.push(format!("--etcd-user={user}"));
    flags.push(format!("--etcd-password-file={}", file.display()));
    flags
}

async fn connect(server: &EtcdServer, prefix: &str, extra: &[String]) -> EtcdRegistry {
    args(server, prefix, extra)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

async fn refused(server: &EtcdServer, prefix: &str, extra: &[String]) -> RegistryError {
    args(server, prefix, extra)
        .connect()
        .await
        .expect_err("etcd must refuse this client")
}

/// A raw etcd-client as root (or, before auth is on, as nobody), over TLS.
async fn root_client(server: &EtcdServer, pki: &Pki, with_password: bool) -> Client {
    let (cert, key) = pki.issue("root");
    let read = |p: &Path| std::fs::read(p).expect("read PEM");
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read(&pki.ca_file())))
        .identity(Identity::from_pem(read(&cert), read(&key)))
        .assume_http2(true);
    let mut options = ConnectOptions::new().with_tls(tls);
    if with_password {
        options = options
            .with_user("root", ROOT_PASSWORD)
            .with_auto_token_refresh(true);
    }
    Client::connect([server.endpoint()], Some(options))
        .await
        .expect("root client")
}

/// Creates root and turns authentication on.
async fn enable_auth(server: &EtcdServer, pki: &Pki) {
    let mut c = root_client(server, pki, false).await;
    c.user_add("root", ROOT_PASSWORD, None).await.expect("root");
    c.role_add("root").await.expect("root role");
    c.user_grant_role("root", "root").await.expect("grant root");
    c.auth_enable().await.expect("auth enable");
}

/// Adds `user` with read-write access to every key under `prefix`.
async fn add_user(server: &EtcdServer, pki: &Pki, user: &str, password: &str, prefix: &str) {
    let mut c = root_client(server, pki, true).await;
    c.user_add(user, password, None).await.expect("user");
    c.role_add(user).await.expect("role");
    c.role_grant_permission(user, Permission::read_write(prefix).with_prefix())
        .await
        .expect("grant");
    c.user_grant_role(user, user).await.expect("grant role");
}

fn model(name: &str) -> ModelName {
    ModelName::new(name).expect("valid model name")
}

fn worker(address: &str) -> WorkerRecord {
    WorkerRecord {
        address: address.into(),
        device: "cpu".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_registry_puts_gets_and_watches_over_tls_with_a_client_certificate() {
    let pki = Pki::new("tls");
    let server = tls_etcd(&pki, &[]);
    assert!(server.endpoint().starts_with("https://"));
    let writer = connect(&server, "/tls", &tls_flags(&pki, "writer")).await;
    let watcher = connect(&server, "/tls", &tls_flags(&pki, "watcher")).await;
    let m = model("mnist");
    writer
        .put_available(&m, &AvailableVersions::default())
        .await
        .expect("put over TLS");
    writer
        .put_worker("w1", &worker("10.0.0.1:9000"))
        .await
        .expect("put worker over TLS");
    let seen = wait_for(
        &watcher,
        "the model and the worker, watched over TLS",
        |s| s.models.contains_key(&m) && s.workers.contains_key("w1"),
    )
    .await;
    assert_eq!(seen.workers["w1"].address, "10.0.0.1:9000");
    let fresh = watcher.state().await.expect("get over TLS");
    assert!(fresh.models.contains_key(&m) && fresh.workers.contains_key("w1"));
}

#[tokio::test]
async fn clients_with_another_ca_without_a_certificate_or_without_a_ca_are_refused() {
    let pki = Pki::new("right");
    let server = tls_etcd(&pki, &[]);

    // A CA that did not sign etcd's certificate: this client cannot trust etcd.
    let stranger = Pki::new("stranger");
    let err = refused(&server, "/tls", &tls_flags(&stranger, "client")).await;
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    assert!(text.contains("TLS with etcd at"), "{text}");
    assert!(text.contains("--etcd-ca-file"), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // The right CA but no client certificate: etcd (--client-cert-auth) refuses us.
    let ca_only = [format!("--etcd-ca-file={}", pki.ca_file().display())];
    let err = refused(&server, "/tls", &ca_only).await;
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    assert!(text.contains(&server.endpoint()), "{text}");
    assert!(text.contains("presents no certificate"), "{text}");

    // No CA at all for an https:// endpoint: refused before any connection.
    let err = refused(&server, "/tls", &[]).await;
    assert!(matches!(err, RegistryError::Config(_)), "{err:?}");
    assert!(
        err.to_string().contains("--etcd-ca-file is not set"),
        "{err}"
    );

    // Plaintext against the TLS port: never silently "works".
    let plain = Cli::try_parse_from([
        "test".to_string(),
        format!(
            "--etcd-endpoints={}",
            server.endpoint().replace("https://", "http://")
        ),
    ])
    .expect("flags parse")
    .etcd;
    let err = plain.connect().await.expect_err("plaintext to a TLS port");
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("no etcd answered"), "{err}");
}

#[tokio::test]
async fn the_right_user_works_and_a_wrong_password_is_refused_with_a_sentence() {
    let pki = Pki::new("auth");
    let server = tls_etcd(&pki, &[]);
    enable_auth(&server, &pki).await;
    add_user(&server, &pki, "svc", "right-pw", "/auth/").await;

    let r = connect(&server, "/auth", &user_flags(&pki, "svc", "right-pw")).await;
    r.put_worker("w1", &worker("10.0.0.1:1"))
        .await
        .expect("put as svc");
    wait_for(&r, "w1 watched as svc", |s| s.workers.contains_key("w1")).await;

    let err = refused(&server, "/auth", &user_flags(&pki, "svc", "wrong-pw")).await;
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Denied(_)), "{err:?}");
    assert!(text.contains("refused user 'svc'"), "{text}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(text.contains("--etcd-password-file"), "{text}");

    // A user whose roles do not cover the prefix cannot even list it.
    let err = refused(&server, "/elsewhere", &user_flags(&pki, "svc", "right-pw")).await;
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Denied(_)), "{err:?}");
    assert!(
        text.contains("denied list /elsewhere/ to user 'svc': permission denied"),
        "{text}"
    );
    assert!(!text.contains("password"), "not a password problem: {text}");
}

#[tokio::test]
async fn the_role_recipe_lets_each_service_write_only_its_own_keys() {
    let pki = Pki::new("roles");
    let server = tls_etcd(&pki, &[]);
    enable_auth(&server, &pki).await;
    let passwords = tempfile::tempdir().expect("tempdir");
    for service in ["discovery", "worker", "router", "operator"] {
        std::fs::write(passwords.path().join(service), format!("{service}-pw\n"))
            .expect("password file");
    }
    let (root_cert, root_key) = pki.issue("root");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/etcd-roles.sh");
    let run = || {
        Command::new("bash")
            .arg(&script)
            .args(["--prefix", "/prod", "--models", "mnist,resnet"])
            .arg("--password-dir")
            .arg(passwords.path())
            .env("ETCDCTL_ENDPOINTS", server.endpoint())
            .env("ETCDCTL_CACERT", pki.ca_file())
            .env("ETCDCTL_CERT", &root_cert)
            .env("ETCDCTL_KEY", &root_key)
            .env("ETCDCTL_USER", format!("root:{ROOT_PASSWORD}"))
            .output()
            .expect("run scripts/etcd-roles.sh")
    };
    let out = run();
    assert!(
        out.status.success(),
        "etcd-roles.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Running it again (after adding a model, say) must work too.
    let again = run();
    assert!(
        again.status.success(),
        "second run: {}",
        String::from_utf8_lossy(&again.stderr)
    );

    let flags = |service: &str| {
        let user = format!("aspire-{service}");
        let mut f = tls_flags(&pki, &user);
        f.push(format!("--etcd-user={user}"));
        f.push(format!(
            "--etcd-password-file={}",
            passwords.path().join(service).display()
        ));
        f
    };
    let discovery = connect(&server, "/prod", &flags("discovery")).await;
    let worker_r = connect(&server, "/prod", &flags("worker")).await;
    let router = connect(&server, "/prod", &flags("router")).await;
    let operator = connect(&server, "/prod", &flags("operator")).await;
    let mnist = model("mnist");

    discovery
        .put_available(&mnist, &AvailableVersions::default())
        .await
        .expect("discovery writes available");
    discovery
        .put_aspired(&mnist, &AspiredVersions::default())
        .await
        .expect("discovery writes aspired");
    worker_r
        .put_worker("w1", &worker("10.0.0.1:9000"))
        .await
        .expect("a worker registers");
    operator
        .set_pinned(&mnist, Some("1"))
        .await
        .expect("an operator pins");
    let seen = wait_for(&router, "every service's write, read by the router", |s| {
        s.workers.contains_key("w1") && s.models.get(&mnist).is_some_and(|m| m.pinned.is_some())
    })
    .await;
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);

    // The point of the recipe: a worker's credentials cannot pin a model.
    let err = worker_r
        .set_pinned(&mnist, Some("2"))
        .await
        .expect_err("a worker may not write a pin");
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Denied(_)), "{err:?}");
    assert!(
        text.contains(
            "denied put /prod/models/mnist/pinned to user 'aspire-worker': permission denied"
        ),
        "{text}"
    );
    // Nor publish versions, nor can discovery pin, operators publish, or the router write.
    let denied = [
        worker_r
            .put_available(&mnist, &AvailableVersions::default())
            .await,
        discovery.set_pinned(&mnist, Some("2")).await,
        operator
            .put_aspired(&mnist, &AspiredVersions::default())
            .await,
        router.put_worker("r1", &worker("10.0.0.9:1")).await,
        router.set_pinned(&mnist, None).await,
        // Models not named to the script get no grants: discovery is refused them.
        discovery
            .put_available(&model("unlisted"), &AvailableVersions::default())
            .await,
    ];
    for (i, result) in denied.into_iter().enumerate() {
        assert!(
            matches!(result, Err(RegistryError::Denied(ref why)) if why.contains("permission denied")),
            "case {i}: {result:?}"
        );
    }
    // The same worker by its certificate alone: etcd takes the user from its common name.
    let by_cert = connect(&server, "/prod", &tls_flags(&pki, "aspire-worker")).await;
    by_cert
        .put_worker("w2", &worker("10.0.0.2:9000"))
        .await
        .expect("a worker registers as its certificate's common name");
    let err = by_cert
        .set_pinned(&mnist, Some("2"))
        .await
        .expect_err("nor may it pin by certificate");
    let text = err.to_string();
    assert!(
        text.contains("denied put /prod/models/mnist/pinned to the user named by this client certificate's common name"),
        "{text}"
    );
    // The pin is still the operator's.
    let state = router.state().await.expect("router reads");
    assert_eq!(state.models[&mnist].pinned.as_deref(), Some("1"));
    // A worker's graceful exit revokes its lease: etcd checks it may delete its records.
    worker_r.close().await.expect("the worker deregisters");
    wait_for(&router, "w1 gone", |s| !s.workers.contains_key("w1")).await;
}

#[tokio::test]
async fn tokens_that_expire_or_vanish_in_a_restart_are_renewed() {
    let pki = Pki::new("tokens");
    // Tokens unused for 2 s expire (etcd's default is 300 s).
    let mut server = tls_etcd(&pki, &["--auth-token-ttl=2"]);
    enable_auth(&server, &pki).await;
    add_user(&server, &pki, "svc", "pw", "/tok/").await;
    let r = connect(&server, "/tok", &user_flags(&pki, "svc", "pw")).await;
    // A worker whose lease (2 s) is kept alive across token expiries: the keep-alives must
    // keep the same lease, not let it lapse and re-register.
    let mut worker_flags = user_flags(&pki, "svc", "pw");
    worker_flags.push("--lease-ttl=2".to_string());
    let w = connect(&server, "/tok", &worker_flags).await;
    w.put_worker("w1", &worker("10.0.0.1:1"))
        .await
        .expect("register");
    let mut root = root_client(&server, &pki, true).await;
    let lease_of_w1 = |mut c: Client| async move {
        let resp = c.get("/tok/workers/w1", None).await.expect("get w1");
        resp.kvs().first().map(|kv| kv.lease())
    };
    let lease_before = lease_of_w1(root.clone()).await.expect("w1 registered");
    // Connected after `r` and never used since, like `r`'s token: once this one is
    // refused, `r`'s has expired too.
    let probe_token_holder = {
        let mut c = root_client(&server, &pki, false).await;
        c.update_user(Some(("svc".into(), "pw".into())))
            .await
            .expect("probe authenticates");
        c
    };
    // etcd tells nobody when a token expires: wait out the TTL, then check it did.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut probe = probe_token_holder.clone();
    let err = probe.get("/tok/x", None).await.expect_err("expired");
    assert!(err.to_string().contains("invalid auth token"), "{err}");

    r.put_available(&model("after_expiry"), &AvailableVersions::default())
        .await
        .expect("a put with an expired token re-authenticates and succeeds");
    assert_eq!(
        lease_of_w1(root.clone()).await,
        Some(lease_before),
        "w1 kept its lease past the token's expiry"
    );

    // etcd keeps simple tokens in memory: after a restart every token is unknown.
    server.restart().expect("restart etcd");
    // The first call may still go to the old connection and fail with a broken pipe (a
    // role retries); what must never happen is a refusal of the vanished token.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match r
            .put_available(&model("after_restart"), &AvailableVersions::default())
            .await
        {
            Ok(()) => break,
            Err(RegistryError::Unavailable(why)) if Instant::now() < deadline => {
                eprintln!("after the restart, retrying: {why}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("a put after the restart must re-authenticate: {e}"),
        }
    }
    wait_for(&r, "both writes watched", |s| {
        s.models.contains_key(&model("after_expiry"))
            && s.models.contains_key(&model("after_restart"))
    })
    .await;

    // A changed password drops the user's tokens; logging in again with the old one fails
    // with a sentence, not a panic or a hang.
    root = root_client(&server, &pki, true).await;
    root.user_change_password("svc", "new-pw")
        .await
        .expect("change password");
    let err = r
        .put_available(&model("after_change"), &AvailableVersions::default())
        .await
        .expect_err("the old password no longer works");
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Denied(_)), "{err:?}");
    assert!(
        text.contains("refused put /tok/models/after_change/available from user 'svc'"),
        "{text}"
    );
    assert!(text.contains("authentication failed"), "{text}");
}

#[tokio::test]
async fn passes_the_conformance_suite_over_tls_with_a_user() {
    let pki = Pki::new("conformance");
    let server = tls_etcd(&pki, &[]);
    enable_auth(&server, &pki).await;
    add_user(&server, &pki, "conf", "conf-pw", "/conformance-").await;
    let flags = user_flags(&pki, "conf", "conf-pw");
    let server = &server;
    conformance::run_all(|prefix| {
        let flags = flags.clone();
        async move { Arc::new(connect(server, &prefix, &flags).await) as Arc<dyn Registry> }
    })
    .await;
}
