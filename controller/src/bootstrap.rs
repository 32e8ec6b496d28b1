//! Opening what a controller (and the CLI acting on its store) needs: the store,
//! the controller settings, the CA behind `internal` certificates, join tokens and
//! revocations.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rampart_config::{Config, ControllerSettings, StoreSettings};

use crate::authority::Authority;
use crate::fleet::registry::InstanceRecord;
use crate::store::{get_json, put_json, Store};
use crate::{authority, fleet, store};

/// Opens the store `config` names.
///
/// # Errors
/// When the store cannot be opened.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(open(config).await?.0)
}

/// The store, and the etcd connection behind it when it is shared (for the leader
/// lease and following the leader), so that one connection serves both.
pub(crate) async fn open(
    config: &Config,
) -> anyhow::Result<(Arc<dyn Store>, Option<store::etcd::EtcdStore>)> {
    match &settings(config).store {
        StoreSettings::Local => Ok((
            Arc::new(store::local::LocalStore::open(
                &config.server.data_dir.join("controller"),
            )?),
            None,
        )),
        StoreSettings::Etcd(etcd) => {
            let shared = store::etcd::EtcdStore::connect(&etcd.endpoints, &etcd.prefix).await?;
            Ok((Arc::new(shared.clone()), Some(shared)))
        }
    }
}

/// The controller settings of `config` (defaults when the section is absent).
#[must_use]
pub fn settings(config: &Config) -> ControllerSettings {
    config
        .controller
        .clone()
        .unwrap_or_else(|| toml::from_str("").expect("every controller setting has a default"))
}

/// The CA behind `internal` certificates. With a local store it is the same one a
/// standalone proxy uses (`<data_dir>/ca/`), so clients trust one file in every mode.
pub(crate) async fn serving_ca(
    config: &Config,
    store: &dyn Store,
) -> anyhow::Result<rampart_pki::Ca> {
    match settings(config).store {
        StoreSettings::Local => {
            let dir = config.server.data_dir.join("ca");
            tokio::task::spawn_blocking(move || {
                rampart_pki::Ca::load_or_create(&dir, "Rampart internal CA")
            })
            .await?
        }
        StoreSettings::Etcd(_) => authority::load(store, Authority::Serving).await,
    }
}

/// Creates a join token valid for `ttl`: one-time, or usable until it expires.
///
/// # Errors
/// When the store fails.
pub async fn create_token(
    config: &Config,
    ttl: Duration,
    reusable: bool,
) -> anyhow::Result<String> {
    let store = open_store(config).await?;
    let ca = authority::load(store.as_ref(), Authority::Fleet).await?;
    fleet::tokens::create(store.as_ref(), ttl, &ca.fingerprint()?, reusable).await
}

/// Revokes an enrolled instance: its certificate is refused from now on.
///
/// # Errors
/// When there is no such instance or the store fails.
pub async fn revoke(config: &Config, id: &str) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let key = format!("instances/{id}");
    let mut record: InstanceRecord = get_json(store.as_ref(), &key).await?.with_context(|| {
        format!("no instance {id}; `rampart controller status` lists the enrolled instances")
    })?;
    record.revoked = true;
    put_json(store.as_ref(), &key, &record).await
}
