//! A feed's two JetStream streams (nats-feeds-v1 §1): found and checked, or created when
//! missing, never changed. `MD_<FEED>` captures `<prefix>.<FEED>.>` with limits-based
//! retention of at least the feed's resume window; `MDLV_<FEED>` sources it and keeps one
//! message per subject with no age limit (the last trade and last quote of every
//! instrument, however long ago).

use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config, RetentionPolicy, Source, StorageType, Stream};
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;

use super::contract::{check_description, description, last_values_name, stream_name, stream_subjects};
use crate::config::{NatsConfig, NatsStorage};
use crate::feeds::FeedDef;

/// Why the streams are not usable.
#[derive(Debug)]
pub(crate) enum EnsureError {
    /// A found stream contradicts the contract or this node's feed file: the feed is
    /// refused (never retried, never "fixed" by changing the stream).
    Contract(String),
    /// NATS or JetStream did not answer as hoped (unreachable, timeout): retried.
    Nats(String),
}

/// Both streams of `def`, `MD_<FEED>` returned for consumption (after `MDLV_<FEED>` was
/// found good or created).
pub(crate) async fn ensure(js: &Context, cfg: &NatsConfig, def: &FeedDef) -> Result<Stream, EnsureError> {
    let md = ensure_one(js, &md_config(cfg, def), def, check_md).await?;
    ensure_one(js, &lv_config(cfg, def), def, check_lv).await?;
    Ok(md)
}

fn storage(cfg: &NatsConfig) -> StorageType {
    match cfg.stream_storage {
        NatsStorage::File => StorageType::File,
        NatsStorage::Memory => StorageType::Memory,
    }
}

/// `MD_<FEED>` as a creating edge writes it.
pub(crate) fn md_config(cfg: &NatsConfig, def: &FeedDef) -> Config {
    Config {
        name: stream_name(&def.name),
        subjects: vec![stream_subjects(&cfg.subject_prefix, &def.name)],
        retention: RetentionPolicy::Limits,
        max_age: Duration::from_secs(def.resume.max_age_s),
        storage: storage(cfg),
        num_replicas: cfg.stream_replicas,
        duplicate_window: Duration::from_secs(cfg.duplicate_window_s),
        description: Some(description(def)),
        ..Config::default()
    }
}

/// `MDLV_<FEED>` as a creating edge writes it.
pub(crate) fn lv_config(cfg: &NatsConfig, def: &FeedDef) -> Config {
    Config {
        name: last_values_name(&def.name),
        sources: Some(vec![Source { name: stream_name(&def.name), ..Source::default() }]),
        retention: RetentionPolicy::Limits,
        max_messages_per_subject: 1,
        storage: storage(cfg),
        num_replicas: cfg.stream_replicas,
        description: Some(description(def)),
        ..Config::default()
    }
}

/// A found `MD_<FEED>` must capture exactly the feed's subjects.
fn check_md(found: &Config, want: &Config) -> Result<(), String> {
    if found.subjects != want.subjects {
        return Err(format!("it captures {:?}, the contract says {:?}", found.subjects, want.subjects));
    }
    if found.retention != RetentionPolicy::Limits {
        return Err(format!("its retention is {:?}; the contract needs limits-based retention", found.retention));
    }
    Ok(())
}

/// A found `MDLV_<FEED>` must source `MD_<FEED>` and keep one message per subject.
fn check_lv(found: &Config, want: &Config) -> Result<(), String> {
    let md = want.sources.as_ref().and_then(|s| s.first()).map(|s| s.name.as_str()).unwrap_or_default();
    let sources_md = found.sources.as_ref().is_some_and(|s| s.iter().any(|s| s.name == md));
    if !sources_md || found.max_messages_per_subject != 1 || !found.subjects.is_empty() {
        return Err(format!(
            "it must source {md} and keep one message per subject (max_msgs_per_subject = 1, no subjects of its own)"
        ));
    }
    Ok(())
}

async fn ensure_one(
    js: &Context,
    want: &Config,
    def: &FeedDef,
    check: fn(&Config, &Config) -> Result<(), String>,
) -> Result<Stream, EnsureError> {
    let name = &want.name;
    let refuse = |why: String| EnsureError::Contract(format!("stream {name} cannot serve feed {}: {why}", def.name));
    // Two edges may start at once: one creates, the other sees "already exists" and
    // reads what was created. Twice round is enough for that race.
    for _ in 0..2 {
        match js.get_stream(name).await {
            Ok(mut stream) => {
                let info = stream.info().await.map_err(|e| EnsureError::Nats(format!("stream {name} info: {e}")))?;
                check(&info.config, want).map_err(refuse)?;
                check_description(info.config.description.as_deref(), def).map_err(refuse)?;
                if want.max_age > Duration::ZERO
                    && info.config.max_age > Duration::ZERO
                    && info.config.max_age < want.max_age
                {
                    tracing::warn!(stream = %name, max_age_s = info.config.max_age.as_secs(),
                        resume_max_age_s = want.max_age.as_secs(),
                        "the stream keeps less than the feed's resume window: edges warm up with less history");
                }
                return Ok(stream);
            }
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(je) if je.error_code() == ErrorCode::STREAM_NOT_FOUND => {}
                _ => return Err(EnsureError::Nats(format!("stream {name}: {e}"))),
            },
        }
        match js.create_stream(want.clone()).await {
            Ok(stream) => {
                tracing::info!(stream = %name, feed = %def.name, "created the JetStream stream");
                return Ok(stream);
            }
            Err(e) => match e.kind() {
                CreateStreamErrorKind::JetStream(je) if je.error_code() == ErrorCode::STREAM_NAME_EXIST => continue,
                _ => return Err(EnsureError::Nats(format!("creating stream {name}: {e}"))),
            },
        }
    }
    Err(EnsureError::Nats(format!("stream {name}: created and removed again while starting")))
}
