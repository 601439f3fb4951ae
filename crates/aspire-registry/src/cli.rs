//! The etcd flags every clustered binary takes (`aspire-discovery`, `aspire-worker`,
//! `aspire-router`, `aspirectl`), so they are spelt and defaulted alike.

use std::time::Duration;

use aspire_core::keys::{DEFAULT_PREFIX, KeySchema};
use clap::Args;

use crate::{EtcdOptions, EtcdRegistry, RegistryError};

/// Where etcd is and which prefix to work under.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long = "etcd-endpoints",
        visible_alias = "etcd_endpoints",
        env = "ASPIRE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every Aspire key in etcd.
    #[arg(long, env = "ASPIRE_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Seconds a worker's registration outlives the worker (its etcd lease).
    #[arg(
        long = "lease-ttl",
        visible_alias = "lease_ttl",
        env = "ASPIRE_LEASE_TTL",
        default_value_t = 10
    )]
    pub lease_ttl: u64,
}

impl EtcdArgs {
    /// Connects; the error names the endpoints.
    pub async fn connect(&self) -> Result<EtcdRegistry, RegistryError> {
        let options = EtcdOptions {
            lease_ttl: Duration::from_secs(self.lease_ttl.max(1)),
            ..EtcdOptions::default()
        };
        EtcdRegistry::connect(&self.etcd_endpoints, KeySchema::new(&self.prefix), options).await
    }
}
