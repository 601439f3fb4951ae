//! TLS and mTLS on every gRPC hop, with real processes on loopback and certificates made
//! in the test (`aspire_tls::testing`, rcgen): TensorFlow Serving's own Python client
//! against `aspire-server` over TLS and mTLS; plaintext clients and clients without a
//! certificate refused; the SSL config file rotated to a new CA (a Kubernetes-style
//! symlink swap) and picked up by new connections without a restart; the router talking
//! to a worker over mTLS, and a router without a client certificate refused by it.
//! Needs `cargo build --workspace --bins` first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use aspire_mnist::client::{ClientOptions, build_request};
use aspire_proto::serving::model_service_client::ModelServiceClient;
use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_proto::serving::{GetModelStatusRequest, PredictResponse};
use aspire_registry::etcd_server::EtcdServer;
use aspire_tests::{
    Process, Server, eventually, export, free_port, mnist_data, spec, workspace_root,
};
use aspire_tls::testing::{Pair, TestCa, ssl_config_text};
use clap::Parser;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const LIMIT: Duration = Duration::from_secs(90);

/// Writes `text` to `dir/name`; returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` when given.
async fn tls_channel(
    addr: &str,
    ca: &str,
    identity: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Whether a health check over `channel` is answered (any serving status).
async fn answered(channel: Result<Channel, tonic::transport::Error>) -> bool {
    let Ok(channel) = channel else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(5), check).await,
        Ok(Ok(_))
    )
}

/// Whether a plaintext gRPC client gets an answer from `addr`.
async fn plaintext_answered(addr: &str) -> bool {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    answered(channel).await
}

/// TensorFlow Serving's Python client (tests/tf_serving_client.py) against `addr`.
async fn python_client(addr: &str, tls_args: Vec<String>) -> Output {
    let python = workspace_root().join(".aspire-tfs-client/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh (make test does)",
        python.display()
    );
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(workspace_root().join("tests/tf_serving_client.py"))
            .arg(addr)
            .arg(mnist_data())
            .args(tls_args)
            .output()
            .expect("run python client")
    })
    .await
    .expect("join")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until `model` v1 is AVAILABLE at `addr` over TLS with `ca` (and `identity`).
async fn wait_available_tls(addr: &str, ca: &str, identity: Option<&Pair>) {
    eventually(
        LIMIT,
        &format!("mnist v1 AVAILABLE at {addr} over TLS"),
        || async {
            let mut client = ModelServiceClient::new(tls_channel(addr, ca, identity).await.ok()?);
            let status = client
                .get_model_status(GetModelStatusRequest {
                    model_spec: Some(spec("mnist", None)),
                })
                .await
                .ok()?;
            status
                .into_inner()
                .model_version_status
                .iter()
                .any(|s| s.version == 1 && s.state == 30)
                .then_some(())
        },
    )
    .await;
}

/// aspire-server with `--ssl_config_file` (TF Serving's spelling) serves TF Serving's
/// Python client over TLS, then, after the file is changed to ask for client
/// certificates, over mTLS only: a client without a certificate and a plaintext client
/// are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tf_serving_python_client_over_tls_and_mtls() {
    let ca = TestCa::new("aspire test CA");
    let server_pair = ca.issue(&["127.0.0.1", "localhost"]);
    let client_pair = ca.issue(&["tf-serving-client"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    export(&dir.join("m"), 200, 1);
    let ca_file = write(dir, "ca.pem", &ca.cert_pem());
    let cert_file = write(dir, "client.pem", &client_pair.cert);
    let key_file = write(dir, "client.key", &client_pair.key);
    let ssl = write(dir, "ssl.cfg", &ssl_config_text(&server_pair, None, false));

    let server = Server::start(&[
        "--model_name=mnist",
        &format!("--model_base_path={}", dir.join("m").display()),
        &format!("--ssl_config_file={}", ssl.display()),
    ]);
    let addr = server.addr.clone();
    wait_available_tls(&addr, &ca.cert_pem(), None).await;

    let ca_arg = vec!["--ca".to_string(), ca_file.display().to_string()];
    let out = python_client(&addr, ca_arg.clone()).await;
    println!("TLS: {}", text(&out));
    assert!(
        out.status.success(),
        "python client over TLS failed:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("metadata and status OK"));
    assert!(
        !plaintext_answered(&addr).await,
        "a plaintext client was answered by a TLS server"
    );

    // Ask for client certificates: picked up from the file without a restart.
    std::fs::write(
        &ssl,
        ssl_config_text(&server_pair, Some(&ca.cert_pem()), true),
    )
    .expect("rewrite");
    eventually(LIMIT, "a client without a certificate refused", || async {
        (!answered(tls_channel(&addr, &ca.cert_pem(), None).await).await).then_some(())
    })
    .await;
    assert!(answered(tls_channel(&addr, &ca.cert_pem(), Some(&client_pair)).await).await);

    let mut mtls_args = ca_arg.clone();
    mtls_args.extend([
        "--cert".to_string(),
        cert_file.display().to_string(),
        "--key".to_string(),
        key_file.display().to_string(),
    ]);
    let out = python_client(&addr, mtls_args).await;
    println!("mTLS: {}", text(&out));
    assert!(
        out.status.success(),
        "python client over mTLS failed:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("metadata and status OK"));

    let out = python_client(&addr, ca_arg).await;
    assert!(
        !out.status.success(),
        "a python client without a certificate was served under client_verify"
    );
    assert!(text(&out).contains("UNAVAILABLE"), "{}", text(&out));
    assert!(!plaintext_answered(&addr).await);
    assert!(
        server.log().contains("SSL config file changed"),
        "{}",
        server.log()
    );
    assert_eq!(server.terminate(), Some(0));
}

/// Points `link` at a fresh directory holding `ssl.cfg` with `text`, the way a
/// Kubernetes Secret volume updates: a new timestamped directory, then an atomic swap
/// of the `..data` symlink.
fn publish_secret(root: &Path, generation: u32, text: &str) {
    let dated = root.join(format!("..2026_{generation}"));
    std::fs::create_dir_all(&dated).expect("mkdir");
    std::fs::write(dated.join("ssl.cfg"), text).expect("write");
    let tmp_link = root.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(dated.file_name().expect("name"), &tmp_link).expect("symlink");
    std::fs::rename(&tmp_link, root.join("..data")).expect("swap ..data");
    let file = root.join("ssl.cfg");
    if std::fs::symlink_metadata(&file).is_err() {
        std::os::unix::fs::symlink("..data/ssl.cfg", &file).expect("symlink ssl.cfg");
    }
}

/// The server certificate is rotated to one from a new CA by swapping a Secret-style
/// symlink: new connections get it without a restart; an invalid file in between is
/// logged and the certificate in use kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_reaches_new_connections_without_restart() {
    let (old_ca, new_ca) = (TestCa::new("old CA"), TestCa::new("new CA"));
    let tmp = tempfile::tempdir().expect("tmp");
    let secret = tmp.path().join("secret");
    std::fs::create_dir_all(&secret).expect("mkdir");
    let old_text = ssl_config_text(&old_ca.issue(&["127.0.0.1"]), None, false);
    publish_secret(&secret, 1, &old_text);
    std::fs::create_dir_all(tmp.path().join("m")).expect("mkdir");

    let server = Server::start(&[
        "--model_name=mnist",
        &format!("--model_base_path={}", tmp.path().join("m").display()),
        &format!("--ssl-config-file={}", secret.join("ssl.cfg").display()),
    ]);
    let addr = server.addr.clone();
    eventually(LIMIT, "the old CA's certificate served", || async {
        answered(tls_channel(&addr, &old_ca.cert_pem(), None).await)
            .await
            .then_some(())
    })
    .await;
    assert!(!answered(tls_channel(&addr, &new_ca.cert_pem(), None).await).await);

    // A broken file is refused and the certificate in use stays.
    publish_secret(&secret, 2, "server_key: \"not PEM\"\nserver_cert: \"\"\n");
    eventually(LIMIT, "the invalid file logged", || async {
        server
            .log()
            .contains("keeping the TLS config in use")
            .then_some(())
    })
    .await;
    assert!(
        server.log().contains("field server_cert"),
        "{}",
        server.log()
    );
    assert!(answered(tls_channel(&addr, &old_ca.cert_pem(), None).await).await);

    let new_text = ssl_config_text(&new_ca.issue(&["127.0.0.1"]), None, false);
    publish_secret(&secret, 3, &new_text);
    eventually(LIMIT, "the new CA's certificate served", || async {
        answered(tls_channel(&addr, &new_ca.cert_pem(), None).await)
            .await
            .then_some(())
    })
    .await;
    assert!(!answered(tls_channel(&addr, &old_ca.cert_pem(), None).await).await);
    assert_eq!(
        server.terminate(),
        Some(0),
        "the server restarted or failed"
    );
}

/// aspire-server refuses to start on an unusable SSL config file, naming file and field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_ssl_config_stops_the_server_with_a_sentence() {
    let ca = TestCa::new("ca");
    let tmp = tempfile::tempdir().expect("tmp");
    let pair = ca.issue(&["127.0.0.1"]);
    let ssl = write(tmp.path(), "ssl.cfg", &ssl_config_text(&pair, None, true));
    let out = Command::new(aspire_tests::bin("aspire-server"))
        .args([
            "--host=127.0.0.1".to_string(),
            format!("--port={}", free_port()),
            "--model_name=mnist".to_string(),
            format!("--model_base_path={}", tmp.path().display()),
            format!("--ssl_config_file={}", ssl.display()),
        ])
        .output()
        .expect("run aspire-server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with client_verify and no custom_ca"
    );
    assert!(
        stderr.contains(&format!("{}: field custom_ca", ssl.display())),
        "{stderr}"
    );
}

fn mnist_predict(data: &aspire_mnist::data::MnistData) -> aspire_proto::serving::PredictRequest {
    build_request(
        &ClientOptions::parse_from(["mnist-client"]),
        data.test.image(0),
    )
}

fn scores(response: &PredictResponse) -> usize {
    response
        .outputs
        .get("scores")
        .map_or(0, |t| t.float_val.len() + t.tensor_content.len() / 4)
}

/// etcd, discovery, a worker that requires client certificates (`client_verify`), a
/// router with the client certificate that serves its own clients over TLS: a Predict
/// goes through both TLS hops. A second router that trusts the worker's CA but has no
/// client certificate is refused by the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_worker_over_mtls() {
    let ca = TestCa::new("cluster CA");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    export(&dir.join("m"), 200, 1);
    let data = aspire_mnist::data::load(Path::new(&mnist_data())).expect("data");
    let etcd = EtcdServer::start().expect("etcd");
    let etcd_flags = [
        format!("--etcd-endpoints={}", etcd.endpoint()),
        "--prefix=/tls".to_string(),
    ];
    let _discovery = Process::start(
        "aspire-discovery",
        &[
            &etcd_flags[..],
            &[
                "--model_name=mnist".into(),
                format!("--model_base_path={}", dir.join("m").display()),
            ],
        ]
        .concat(),
    );

    let worker_ssl = write(
        dir,
        "worker-ssl.cfg",
        &ssl_config_text(&ca.issue(&["127.0.0.1"]), Some(&ca.cert_pem()), true),
    );
    let worker_port = free_port();
    let mut worker = Process::start(
        "aspire-worker",
        &[
            &etcd_flags[..],
            &[
                "--host=127.0.0.1".into(),
                format!("--port={worker_port}"),
                "--worker-id=w1".into(),
                "--metrics-port=0".into(),
                format!("--storage-root={}", dir.join("m").display()),
                format!("--ssl-config-file={}", worker_ssl.display()),
            ],
        ]
        .concat(),
    );
    worker.wait_listening(&format!("127.0.0.1:{worker_port}"));

    let router_pair = ca.issue(&["aspire-router"]);
    let ca_file = write(dir, "ca.pem", &ca.cert_pem());
    let router_cert = write(dir, "router.pem", &router_pair.cert);
    let router_key = write(dir, "router.key", &router_pair.key);
    let router_ssl = write(
        dir,
        "router-ssl.cfg",
        &ssl_config_text(&ca.issue(&["127.0.0.1"]), None, false),
    );
    let start_router = |worker_tls: Vec<String>| {
        let port = free_port();
        let mut router = Process::start(
            "aspire-router",
            &[
                &etcd_flags[..],
                &[
                    "--host=127.0.0.1".into(),
                    format!("--port={port}"),
                    "--metrics-port=0".into(),
                    format!("--ssl_config_file={}", router_ssl.display()),
                ],
                &worker_tls[..],
            ]
            .concat(),
        );
        let addr = format!("127.0.0.1:{port}");
        router.wait_listening(&addr);
        (router, addr)
    };
    let (_router, addr) = start_router(vec![
        format!("--worker-tls-ca-file={}", ca_file.display()),
        format!("--worker-tls-cert-file={}", router_cert.display()),
        format!("--worker-tls-key-file={}", router_key.display()),
    ]);
    let request = mnist_predict(&data);
    let response = eventually(LIMIT, "a Predict through the router over mTLS", || async {
        let channel = tls_channel(&addr, &ca.cert_pem(), None).await.ok()?;
        PredictionServiceClient::new(channel)
            .predict(request.clone())
            .await
            .ok()
    })
    .await;
    assert_eq!(scores(response.get_ref()), 10, "{response:?}");
    assert!(
        !plaintext_answered(&addr).await,
        "the TLS router answered plaintext"
    );

    // Trusts the worker's CA but has no client certificate: the worker refuses it.
    let (_bare_router, bare_addr) =
        start_router(vec![format!("--worker-tls-ca-file={}", ca_file.display())]);
    wait_available_tls(&bare_addr, &ca.cert_pem(), None).await;
    let channel = tls_channel(&bare_addr, &ca.cert_pem(), None)
        .await
        .expect("client to router");
    let refused = PredictionServiceClient::new(channel)
        .predict(request.clone())
        .await
        .expect_err("a router without a client certificate was served by the worker");
    // Under TLS 1.3 the client finishes its side of the handshake before the worker
    // checks for a certificate, so the refusal reaches the router either as a failed
    // connection or as the connection closing under the call; both mean the worker went
    // away for this router, and the client gets UNAVAILABLE naming it.
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        worker.log().contains("TLS handshake refused"),
        "{}",
        worker.log()
    );
    drop(etcd);
}
