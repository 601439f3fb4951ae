//! The methods the router answers itself, from the registry rather than a worker:
//! GetModelMetadata (signatures from the `available` key), GetModelStatus (the workers'
//! states aggregated per version), and UNIMPLEMENTED for the tf.Example methods.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use aspire_core::Version;
use aspire_core::records::VersionState;
use aspire_proto::convert::signature_def_map;
use aspire_proto::serving::model_service_server::ModelService;
use aspire_proto::serving::prediction_service_server::PredictionService;
use aspire_proto::serving::{
    ClassificationRequest, ClassificationResponse, GetModelMetadataRequest,
    GetModelMetadataResponse, GetModelStatusRequest, GetModelStatusResponse, ModelSpec,
    ModelVersionStatus, MultiInferenceRequest, MultiInferenceResponse, PredictRequest,
    PredictResponse, RegressionRequest, RegressionResponse, ReloadConfigRequest,
    ReloadConfigResponse, StatusProto, model_spec::VersionChoice,
};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::error::RouterError;
use crate::forward::Router;
use crate::routing_table::{RoutingTable, requested_version};

/// TensorFlow's error code UNKNOWN, which workers report a failed load with.
const LOAD_FAILED_CODE: i32 = 2;

const TF_EXAMPLE_METHODS: &str = "Aspire serves TorchScript models through Predict only; \
    Classify, Regress and MultiInference take tf.Example inputs for TensorFlow's \
    classification and regression signatures, which TorchScript models do not have";

/// The typed half of the router's API.
#[derive(Debug, Clone)]
pub(crate) struct RouterApi {
    router: Arc<Router>,
}

impl RouterApi {
    pub(crate) fn new(router: Arc<Router>) -> Self {
        Self { router }
    }
}

fn model_spec(spec: Option<ModelSpec>) -> Result<ModelSpec, RouterError> {
    spec.ok_or_else(|| RouterError::InvalidArgument("model_spec is missing".into()))
}

fn metadata(
    table: &RoutingTable,
    req: GetModelMetadataRequest,
) -> Result<GetModelMetadataResponse, RouterError> {
    let spec = model_spec(req.model_spec)?;
    if req.metadata_field.is_empty() {
        return Err(RouterError::InvalidArgument(
            "metadata_field is empty; ask for \"signature_def\"".into(),
        ));
    }
    if let Some(f) = req.metadata_field.iter().find(|f| *f != "signature_def") {
        return Err(RouterError::InvalidArgument(format!(
            "metadata field '{f}' is not supported; the only one is \"signature_def\""
        )));
    }
    let routes = table.model(&spec.name)?;
    let wanted = requested_version(&spec)?;
    let stored = table
        .state
        .models
        .get(&routes.name)
        .and_then(|m| m.available.as_ref());
    let in_storage = |v: Version| stored.and_then(|a| a.get(v));
    // The version Predict would serve, else (nothing loaded yet) the newest in storage.
    let found = match wanted {
        Some(v) => in_storage(v),
        None => routes
            .default_version()
            .and_then(in_storage)
            .or_else(|| stored.and_then(|a| a.versions.last())),
    };
    let entry = found.ok_or_else(|| RouterError::VersionNotFound {
        model: routes.name.clone(),
        what: match wanted {
            Some(v) => format!("version {v} is not in storage"),
            None => "no version is in storage yet".into(),
        },
        available: stored.map(|a| a.numbers()).unwrap_or_default(),
    })?;
    let any = prost_types::Any {
        type_url: aspire_proto::SIGNATURE_DEF_MAP_TYPE_URL.to_string(),
        value: signature_def_map(&entry.signatures).encode_to_vec(),
    };
    Ok(GetModelMetadataResponse {
        model_spec: Some(ModelSpec {
            name: routes.name.to_string(),
            version_choice: Some(VersionChoice::Version(entry.version.as_i64())),
            signature_name: String::new(),
        }),
        metadata: HashMap::from([("signature_def".to_string(), any)]),
    })
}

/// How far along a version is, for picking the most advanced state workers report.
fn progress(state: VersionState) -> u8 {
    match state {
        VersionState::End => 0,
        VersionState::Unloading => 1,
        VersionState::Start => 2,
        VersionState::Loading => 3,
        VersionState::Available => 4,
    }
}

/// One version's state across workers, and the first load error any of them reports.
struct Aggregate {
    state: VersionState,
    error: Option<String>,
}

fn status(
    table: &RoutingTable,
    req: GetModelStatusRequest,
) -> Result<GetModelStatusResponse, RouterError> {
    let spec = model_spec(req.model_spec)?;
    let routes = table.model(&spec.name)?;
    let wanted = requested_version(&spec)?;
    let mut versions: BTreeMap<Version, Aggregate> = BTreeMap::new();
    for worker in table.workers.iter().filter(|w| w.is_live()) {
        let Some(statuses) = worker.record.models.get(&routes.name) else {
            continue;
        };
        for (version, s) in statuses {
            let agg = versions.entry(*version).or_insert(Aggregate {
                state: s.state,
                error: None,
            });
            if progress(s.state) > progress(agg.state) {
                agg.state = s.state;
            }
            if let (None, Some(e)) = (&agg.error, &s.error) {
                agg.error = Some(format!("worker '{}': {e}", worker.id));
            }
        }
    }
    // A desired version no worker has started on yet is known, not yet loading.
    for version in routes.desired() {
        versions.entry(*version).or_insert(Aggregate {
            state: VersionState::Start,
            error: None,
        });
    }
    let statuses: Vec<ModelVersionStatus> = versions
        .into_iter()
        .rev()
        .filter(|(v, _)| wanted.is_none_or(|w| w == *v))
        .map(|(v, agg)| {
            // One worker's failed load does not make a version others serve an error.
            let error = agg.error.filter(|_| agg.state != VersionState::Available);
            ModelVersionStatus {
                version: v.as_i64(),
                state: agg.state.tf_number(),
                status: Some(StatusProto {
                    error_code: if error.is_some() { LOAD_FAILED_CODE } else { 0 },
                    error_message: error.unwrap_or_default(),
                }),
            }
        })
        .collect();
    if let (true, Some(v)) = (statuses.is_empty(), wanted) {
        return Err(RouterError::VersionNotFound {
            model: routes.name.clone(),
            what: format!("version {v} is not known to any worker"),
            available: routes.live_versions(),
        });
    }
    Ok(GetModelStatusResponse {
        model_version_status: statuses,
    })
}

#[tonic::async_trait]
impl PredictionService for RouterApi {
    async fn classify(
        &self,
        _: Request<ClassificationRequest>,
    ) -> Result<Response<ClassificationResponse>, Status> {
        Err(RouterError::Unimplemented(TF_EXAMPLE_METHODS.into()).into())
    }

    async fn regress(
        &self,
        _: Request<RegressionRequest>,
    ) -> Result<Response<RegressionResponse>, Status> {
        Err(RouterError::Unimplemented(TF_EXAMPLE_METHODS.into()).into())
    }

    /// Never called: [`crate::prediction_service`] takes Predict before this server.
    async fn predict(
        &self,
        _: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        Err(Status::internal(
            "Predict reached the typed server; this is a router bug",
        ))
    }

    async fn multi_inference(
        &self,
        _: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(RouterError::Unimplemented(TF_EXAMPLE_METHODS.into()).into())
    }

    async fn get_model_metadata(
        &self,
        req: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        let table = self.router.table.load_full();
        Ok(Response::new(metadata(&table, req.into_inner())?))
    }
}

#[tonic::async_trait]
impl ModelService for RouterApi {
    async fn get_model_status(
        &self,
        req: Request<GetModelStatusRequest>,
    ) -> Result<Response<GetModelStatusResponse>, Status> {
        let table = self.router.table.load_full();
        Ok(Response::new(status(&table, req.into_inner())?))
    }

    async fn handle_reload_config_request(
        &self,
        _: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigResponse>, Status> {
        Err(RouterError::Unimplemented(
            "HandleReloadConfigRequest is not supported by the router; models are \
             configured where discovery runs"
                .into(),
        )
        .into())
    }
}
