//! TensorFlow Serving's gRPC API on top of the version manager: `PredictionService`
//! (Predict, GetModelMetadata; Classify, Regress and MultiInference answer UNIMPLEMENTED)
//! and `ModelService` (GetModelStatus).

use std::collections::HashMap;
use std::sync::Arc;

use aspire_core::{ModelName, Signature, SignatureMap, TensorSpec, Version};
use aspire_ingress::RequestBudget;
use aspire_proto::TensorProto;
use aspire_proto::serving::model_service_server::ModelService;
use aspire_proto::serving::prediction_service_server::PredictionService;
use aspire_proto::serving::{
    self as pb, ClassificationRequest, ClassificationResponse, GetModelMetadataRequest,
    GetModelMetadataResponse, GetModelStatusRequest, GetModelStatusResponse, ModelSpec,
    ModelVersionStatus, MultiInferenceRequest, MultiInferenceResponse, PredictRequest,
    PredictResponse, RegressionRequest, RegressionResponse, ReloadConfigRequest,
    ReloadConfigResponse, model_spec::VersionChoice,
};
use prost::Message;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::codec::{self, OutputEncoding};
use crate::error::{FORWARDED_HEADER, WorkerError};
use crate::tensor::HostTensor;
use crate::version_manager::{LoadedVersion, ModelEntry, VersionManager};

/// The gRPC API of one worker (or of `aspire-server`).
#[derive(Clone)]
pub struct ServingApi {
    manager: Arc<VersionManager>,
    encoding: OutputEncoding,
    limits: RequestLimits,
}

/// What one request may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most bytes a request's inputs may take once decoded (`--max-request-bytes`).
    pub max_request_bytes: usize,
}

impl ServingApi {
    /// Serves what `manager` has loaded; outputs are encoded as `encoding` says, requests
    /// are held to `limits`.
    pub fn new(
        manager: Arc<VersionManager>,
        encoding: OutputEncoding,
        limits: RequestLimits,
    ) -> Self {
        Self {
            manager,
            encoding,
            limits,
        }
    }

    /// Answers one Predict; `served_by` is set to the version it reached, for metrics.
    async fn do_predict(
        &self,
        req: PredictRequest,
        deadline: Option<Instant>,
        budget: Option<&RequestBudget>,
        forwarded: bool,
        served_by: &mut Option<Arc<LoadedVersion>>,
    ) -> Result<PredictResponse, WorkerError> {
        let spec = req
            .model_spec
            .ok_or_else(|| WorkerError::InvalidArgument("model_spec is missing".into()))?;
        let lv = {
            let table = self.manager.table();
            let (name, entry) = table.model(&spec.name)?;
            entry.pick_for(name, requested_version(&spec)?, forwarded)?
        };
        *served_by = Some(Arc::clone(&lv));
        let (sig_name, sig) = lv.signature(&spec.signature_name)?;

        let tensors = self.decode_inputs(&sig_name, &sig, req.inputs, &lv, budget)?;
        for name in &req.output_filter {
            if sig.output(name).is_none() {
                return Err(WorkerError::InvalidArgument(format!(
                    "output_filter names '{name}', which signature '{sig_name}' does not have; its outputs: {}",
                    names(&sig.outputs)
                )));
            }
        }

        let submit = lv
            .batcher
            .submit(sig.clone(), tensors, deadline.map(Instant::into_std));
        let outputs = match deadline {
            Some(d) => tokio::time::timeout_at(d, submit).await.map_err(|_| {
                WorkerError::DeadlineExceeded(
                    "deadline exceeded while the request was queued or running".into(),
                )
            })??,
            None => submit.await?,
        };

        let mut out = HashMap::with_capacity(outputs.len());
        for (spec, tensor) in sig.outputs.iter().zip(outputs) {
            if req.output_filter.is_empty() || req.output_filter.contains(&spec.name) {
                out.insert(
                    spec.name.clone(),
                    codec::encode_output(&tensor, self.encoding),
                );
            }
        }
        Ok(PredictResponse {
            model_spec: Some(answer_spec(&lv.model, lv.version, &sig_name)),
            outputs: out,
        })
    }

    /// Checks every size the inputs declare against the limits (rows, decoded bytes,
    /// the in-flight budget) before anything proportional to them is allocated, then
    /// decodes them in the signature's order.
    fn decode_inputs(
        &self,
        sig_name: &str,
        sig: &Signature,
        mut inputs: HashMap<String, TensorProto>,
        lv: &LoadedVersion,
        budget: Option<&RequestBudget>,
    ) -> Result<Vec<HostTensor>, WorkerError> {
        let invalid = WorkerError::InvalidArgument;
        let mut declared = Vec::with_capacity(sig.inputs.len());
        for spec in &sig.inputs {
            let proto = inputs.get(&spec.name).ok_or_else(|| {
                invalid(format!(
                    "input '{}' is missing; signature '{sig_name}' expects inputs: {}",
                    spec.name,
                    names(&sig.inputs)
                ))
            })?;
            declared.push(codec::declare(spec, proto).map_err(invalid)?);
        }
        if let Some(extra) = inputs.keys().find(|k| sig.input(k).is_none()) {
            return Err(invalid(format!(
                "input '{extra}' is not in signature '{sig_name}'; it expects inputs: {}",
                names(&sig.inputs)
            )));
        }
        let batch = lv.batcher.config();
        let mut rows = None;
        for (d, spec) in declared.iter().zip(&sig.inputs) {
            let name = &spec.name;
            let Some(r) = d.rows() else {
                return Err(invalid(format!(
                    "input '{name}' is a scalar; requests need a batch dimension (dimension 0)"
                )));
            };
            if r == 0 {
                return Err(invalid(format!(
                    "input '{name}' has 0 rows; a request needs at least one row"
                )));
            }
            if r > batch.max_batch_size {
                return Err(invalid(if batch.enabled {
                    format!(
                        "input '{name}' has {r} rows; the largest batch is {} rows (max_batch_size, from --max-batch-size or --batching_parameters_file)",
                        batch.max_batch_size
                    )
                } else {
                    format!(
                        "input '{name}' has {r} rows; without batching a request may have at most {} rows",
                        batch.max_batch_size
                    )
                }));
            }
            match rows {
                None => rows = Some((r, name)),
                Some((first, first_name)) if first != r => {
                    return Err(invalid(format!(
                        "input '{name}' has {r} rows but input '{first_name}' has {first}; all inputs need the same dimension 0"
                    )));
                }
                Some(_) => {}
            }
        }
        let total = declared
            .iter()
            .fold(0usize, |sum, d| sum.saturating_add(d.bytes));
        let limit = self.limits.max_request_bytes;
        if total > limit {
            let sizes: Vec<String> = declared
                .iter()
                .zip(&sig.inputs)
                .map(|(d, spec)| {
                    format!(
                        "'{}' {:?} of {}: {} bytes",
                        spec.name, d.shape, d.dtype, d.bytes
                    )
                })
                .collect();
            return Err(invalid(format!(
                "the request's inputs take {total} bytes decoded ({}); the limit is {limit} bytes per request (--max-request-bytes)",
                sizes.join(", ")
            )));
        }
        // Values in tensor_content are shared with the message, already charged as it
        // arrived; typed values are copied into new buffers.
        let copied: usize = declared
            .iter()
            .filter(|d| !d.in_tensor_content)
            .map(|d| d.bytes)
            .sum();
        if let Some(budget) = budget {
            budget.charge(copied).map_err(WorkerError::Overloaded)?;
        }
        let mut tensors = Vec::with_capacity(declared.len());
        for (spec, d) in sig.inputs.iter().zip(declared) {
            let proto = inputs.remove(&spec.name).unwrap_or_default();
            tensors.push(codec::decode_declared(spec, &proto, d).map_err(invalid)?);
        }
        Ok(tensors)
    }

    /// A request whose version was dropped at its drain limit gets, when a router
    /// forwarded it, the "version unloading" answer, so the router sends it again
    /// elsewhere; a direct caller gets the plain UNAVAILABLE it carries.
    fn dropped_if_forwarded(
        &self,
        e: WorkerError,
        forwarded: bool,
        served_by: Option<&LoadedVersion>,
    ) -> WorkerError {
        match (e, served_by) {
            (WorkerError::Unavailable(_), Some(lv)) if forwarded && lv.batcher.is_dropped() => {
                let table = self.manager.table();
                WorkerError::VersionUnloading {
                    model: lv.model.clone(),
                    version: lv.version,
                    default_version: table
                        .model(lv.model.as_str())
                        .ok()
                        .and_then(|(_, entry)| entry.default_version()),
                }
            }
            (e, _) => e,
        }
    }

    fn do_metadata(
        &self,
        req: GetModelMetadataRequest,
    ) -> Result<GetModelMetadataResponse, WorkerError> {
        let spec = req
            .model_spec
            .ok_or_else(|| WorkerError::InvalidArgument("model_spec is missing".into()))?;
        if req.metadata_field.is_empty() {
            return Err(WorkerError::InvalidArgument(
                "metadata_field is empty; ask for \"signature_def\"".into(),
            ));
        }
        if let Some(f) = req.metadata_field.iter().find(|f| *f != "signature_def") {
            return Err(WorkerError::InvalidArgument(format!(
                "metadata field '{f}' is not supported; the only one is \"signature_def\""
            )));
        }
        let table = self.manager.table();
        let (name, entry) = table.model(&spec.name)?;
        let (version, signatures) = metadata_version(name, entry, requested_version(&spec)?)?;
        let map = aspire_proto::convert::signature_def_map(&signatures);
        let any = prost_types::Any {
            type_url: aspire_proto::SIGNATURE_DEF_MAP_TYPE_URL.to_string(),
            value: map.encode_to_vec(),
        };
        Ok(GetModelMetadataResponse {
            model_spec: Some(answer_spec(name, version, "")),
            metadata: HashMap::from([("signature_def".to_string(), any)]),
        })
    }

    fn do_status(&self, req: GetModelStatusRequest) -> Result<GetModelStatusResponse, WorkerError> {
        let spec = req
            .model_spec
            .ok_or_else(|| WorkerError::InvalidArgument("model_spec is missing".into()))?;
        let table = self.manager.table();
        let (name, entry) = table.model(&spec.name)?;
        let wanted = requested_version(&spec)?;
        let statuses: Vec<ModelVersionStatus> = entry
            .statuses
            .iter()
            .rev()
            .filter(|(v, _)| wanted.is_none_or(|w| w == **v))
            .map(|(v, s)| ModelVersionStatus {
                version: v.as_i64(),
                state: s.state.tf_number(),
                status: Some(pb::StatusProto {
                    error_code: if s.error.is_some() { 2 } else { 0 },
                    error_message: s.error.clone().unwrap_or_default(),
                }),
            })
            .collect();
        if let (true, Some(v)) = (statuses.is_empty(), wanted) {
            return Err(WorkerError::VersionNotFound {
                model: name.clone(),
                what: format!("version {v} is not known here"),
                available: entry.loaded.keys().copied().collect(),
            });
        }
        Ok(GetModelStatusResponse {
            model_version_status: statuses,
        })
    }
}

/// The version a `ModelSpec` asks for: `None` for the default one.
fn requested_version(spec: &ModelSpec) -> Result<Option<Version>, WorkerError> {
    match &spec.version_choice {
        None => Ok(None),
        Some(VersionChoice::Version(v)) => Version::from_i64(*v).map(Some).ok_or_else(|| {
            WorkerError::InvalidArgument(format!(
                "model_spec.version is {}; versions are positive integers",
                v
            ))
        }),
        Some(VersionChoice::VersionLabel(label)) => Err(WorkerError::InvalidArgument(format!(
            "model_spec.version_label '{label}' is not supported yet; ask for a version number"
        ))),
    }
}

fn answer_spec(model: &ModelName, version: Version, signature: &str) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        version_choice: Some(VersionChoice::Version(version.as_i64())),
        signature_name: signature.to_string(),
    }
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The version whose signatures metadata describes: the one asked for, else the default
/// served one, else the highest in storage (so metadata works before anything loads).
fn metadata_version(
    model: &ModelName,
    entry: &ModelEntry,
    wanted: Option<Version>,
) -> Result<(Version, SignatureMap), WorkerError> {
    let stored = entry.available.as_ref();
    let version = wanted
        .or_else(|| entry.default_version())
        .or_else(|| stored.and_then(|a| a.versions.last()).map(|v| v.version));
    let found = version.and_then(|v| {
        entry
            .loaded
            .get(&v)
            .map(|lv| lv.signatures.clone())
            .or_else(|| stored.and_then(|a| a.get(v)).map(|a| a.signatures.clone()))
            .map(|s| (v, s))
    });
    found.ok_or_else(|| WorkerError::VersionNotFound {
        model: model.clone(),
        what: match wanted {
            Some(v) => format!("version {v} is not in storage"),
            None => "no version is in storage yet".into(),
        },
        available: entry.loaded.keys().copied().collect(),
    })
}

/// The client's deadline from the `grpc-timeout` header.
pub fn request_deadline<T>(req: &Request<T>) -> Option<Instant> {
    let raw = req
        .metadata()
        .get(aspire_proto::grpc_timeout::HEADER)?
        .to_str()
        .ok()?;
    aspire_proto::grpc_timeout::parse(raw).map(|d| Instant::now() + d)
}

/// Counts one Predict when dropped: with its code, or as CANCELLED if the client went
/// away first (the server then drops the call's future before it finishes).
struct PredictRecord<'a> {
    manager: &'a VersionManager,
    started: std::time::Instant,
    /// The version the request reached; `None` counts it with empty labels.
    served_by: Option<Arc<LoadedVersion>>,
    code: i32,
}

impl Drop for PredictRecord<'_> {
    fn drop(&mut self) {
        let requests = match &self.served_by {
            Some(lv) => &lv.requests,
            None => self.manager.metrics().unresolved(),
        };
        requests.record(self.code, self.started.elapsed());
    }
}

const TF_EXAMPLE_METHODS: &str = "Aspire serves TorchScript models through Predict only; \
    Classify, Regress and MultiInference take tf.Example inputs for TensorFlow's \
    classification and regression signatures, which TorchScript models do not have";

#[tonic::async_trait]
impl PredictionService for ServingApi {
    async fn classify(
        &self,
        _: Request<ClassificationRequest>,
    ) -> Result<Response<ClassificationResponse>, Status> {
        Err(WorkerError::Unimplemented(TF_EXAMPLE_METHODS.into()).into())
    }

    async fn regress(
        &self,
        _: Request<RegressionRequest>,
    ) -> Result<Response<RegressionResponse>, Status> {
        Err(WorkerError::Unimplemented(TF_EXAMPLE_METHODS.into()).into())
    }

    async fn predict(
        &self,
        req: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let mut record = PredictRecord {
            manager: &self.manager,
            started: std::time::Instant::now(),
            served_by: None,
            code: tonic::Code::Cancelled as i32,
        };
        let deadline = request_deadline(&req);
        // Held until the answer is built: the request's bytes stay charged meanwhile.
        let budget = req.extensions().get::<RequestBudget>().cloned();
        let forwarded = req.metadata().contains_key(FORWARDED_HEADER);
        let resp = self
            .do_predict(
                req.into_inner(),
                deadline,
                budget.as_ref(),
                forwarded,
                &mut record.served_by,
            )
            .await
            .map_err(|e| self.dropped_if_forwarded(e, forwarded, record.served_by.as_deref()))
            .map_err(Status::from);
        record.code = resp.as_ref().map_or_else(|s| s.code() as i32, |_| 0);
        Ok(Response::new(resp?))
    }

    async fn multi_inference(
        &self,
        _: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(WorkerError::Unimplemented(TF_EXAMPLE_METHODS.into()).into())
    }

    async fn get_model_metadata(
        &self,
        req: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        Ok(Response::new(self.do_metadata(req.into_inner())?))
    }
}

#[tonic::async_trait]
impl ModelService for ServingApi {
    async fn get_model_status(
        &self,
        req: Request<GetModelStatusRequest>,
    ) -> Result<Response<GetModelStatusResponse>, Status> {
        Ok(Response::new(self.do_status(req.into_inner())?))
    }

    async fn handle_reload_config_request(
        &self,
        _: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigResponse>, Status> {
        Err(WorkerError::Unimplemented(
            "HandleReloadConfigRequest is not supported; edit the file given to \
             --model_config_file (re-read every --model_config_file_poll_wait_seconds)"
                .into(),
        )
        .into())
    }
}
