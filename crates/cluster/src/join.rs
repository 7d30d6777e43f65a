//! Joining a region: one-time, expiring join tokens, node id allocation, and admission of a
//! host (token redeemed, CSR signed, host recorded).
//!
//! A token is printed once, to the operator: `ncjoin1.<ca fingerprint>.<token id>.<secret>`. The
//! joiner pins the cluster CA by the fingerprint before trusting anything a host sends it. The
//! cluster keeps only a record per token (`cluster/join-tokens/<id>`): a BLAKE3 hash of the
//! secret, its expiry and whether it was used. Redeeming a token is a compare-and-swap on that
//! record, so two joiners racing with one token cannot both win.
//!
//! The pure parts ([`JoinToken`], [`JoinTokenRecord::check`]) do no IO; the functions taking a
//! [`ClusterStore`] read and write the records through the leader.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use novacron_store::{Consistency, Transaction};
use novacron_transport::Fingerprint;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use crate::cluster_store::ClusterStore;
use crate::error::{ClusterError, Result};
use crate::identity::ClusterCa;

/// Prefix of the token text, with the token format version.
pub const JOIN_TOKEN_TEXT_PREFIX: &str = "ncjoin1";
/// Store prefix of the token records.
pub const JOIN_TOKEN_KEY_PREFIX: &str = "cluster/join-tokens/";
/// Store prefix of the host records.
pub const HOST_KEY_PREFIX: &str = "cluster/hosts/";
/// Store key of the next node id to hand out.
pub const NEXT_NODE_ID_KEY: &str = "cluster/next-node-id";
/// Format version of [`JoinTokenRecord`] and [`HostRecord`].
pub const CLUSTER_RECORD_FORMAT_VERSION: u32 = 1;
/// Longest lifetime a token may be given.
pub const MAX_JOIN_TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// A join token as the operator copies it. Its `Display` is the token text; `Debug` hides the
/// secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id, names the record.
    pub token_id: String,
    /// The cluster CA the joiner must pin.
    pub ca_fingerprint: Fingerprint,
    secret: [u8; 32],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("JoinToken")
            .field("token_id", &self.token_id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fingerprint: String = self
            .ca_fingerprint
            .0
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.secret);
        write!(
            formatter,
            "{JOIN_TOKEN_TEXT_PREFIX}.{fingerprint}.{}.{secret}",
            self.token_id
        )
    }
}

impl FromStr for JoinToken {
    type Err = ClusterError;

    fn from_str(text: &str) -> Result<JoinToken> {
        let invalid = |reason: &str| ClusterError::InvalidJoinToken {
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [prefix, fingerprint, token_id, secret] = parts.as_slice() else {
            return Err(invalid("expected four parts separated by dots"));
        };
        if *prefix != JOIN_TOKEN_TEXT_PREFIX {
            return Err(invalid(&format!(
                "it does not start with {JOIN_TOKEN_TEXT_PREFIX} (a token of another version or not a join token)"
            )));
        }
        let ca_fingerprint: Fingerprint = fingerprint
            .parse()
            .map_err(|_| invalid("the ca fingerprint is not 64 hex digits"))?;
        if token_id.len() != 16 || !token_id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(invalid("the token id is not 16 hex digits"));
        }
        let secret_bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(secret)
            .map_err(|_| invalid("the secret is not base64url"))?;
        let secret: [u8; 32] = secret_bytes
            .try_into()
            .map_err(|_| invalid("the secret is not 32 bytes"))?;
        Ok(JoinToken {
            token_id: token_id.to_ascii_lowercase(),
            ca_fingerprint,
            secret,
        })
    }
}

impl JoinToken {
    fn secret_hash(&self) -> String {
        blake3::hash(&self.secret).to_hex().to_string()
    }
}

/// What the cluster keeps of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// [`CLUSTER_RECORD_FORMAT_VERSION`].
    pub format_version: u32,
    /// The token's public id.
    pub token_id: String,
    /// BLAKE3 of the secret, hex.
    pub secret_blake3: String,
    /// When it was created.
    pub created_at_unix_ms: u64,
    /// When it stops being accepted.
    pub expires_at_unix_ms: u64,
    /// When it was redeemed, if it was.
    pub used_at_unix_ms: Option<u64>,
    /// The node id handed to the host that redeemed it.
    pub used_by_node_id: Option<u64>,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenRefusal {
    /// No record with this id.
    #[error("no such token (never issued, or removed)")]
    Unknown,
    /// The secret does not match.
    #[error("the secret does not match")]
    WrongSecret,
    /// Past its expiry.
    #[error("the token expired; create a new one with `novacron cluster token create`")]
    Expired,
    /// Already redeemed.
    #[error("the token was already used{}; tokens are one-time: create a new one with `novacron cluster token create`", used_by_node_id.map(|id| format!(" (by node {id})")).unwrap_or_default())]
    AlreadyUsed {
        /// Who used it.
        used_by_node_id: Option<u64>,
    },
    /// Issued for another cluster CA.
    #[error("the token pins another cluster ca")]
    OtherCluster,
}

/// Makes a new token valid for `lifetime` from `now_unix_ms`, and the record the cluster keeps.
pub fn issue_join_token(
    ca_fingerprint: Fingerprint,
    lifetime: Duration,
    now_unix_ms: u64,
) -> Result<(JoinToken, JoinTokenRecord)> {
    if lifetime.is_zero() || lifetime > MAX_JOIN_TOKEN_LIFETIME {
        return Err(ClusterError::InvalidJoinToken {
            reason: format!(
                "a token lifetime must be between 1 ms and {} hours, not {lifetime:?}",
                MAX_JOIN_TOKEN_LIFETIME.as_secs() / 3600
            ),
        });
    }
    let id_bytes: [u8; 8] = rand::random();
    let token = JoinToken {
        token_id: id_bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
        ca_fingerprint,
        secret: rand::random(),
    };
    let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
    let record = JoinTokenRecord {
        format_version: CLUSTER_RECORD_FORMAT_VERSION,
        token_id: token.token_id.clone(),
        secret_blake3: token.secret_hash(),
        created_at_unix_ms: now_unix_ms,
        expires_at_unix_ms: now_unix_ms.saturating_add(lifetime_ms),
        used_at_unix_ms: None,
        used_by_node_id: None,
    };
    Ok((token, record))
}

impl JoinTokenRecord {
    /// Whether `token` may be redeemed at `now_unix_ms`. The secret is compared in constant
    /// time.
    pub fn check(
        &self,
        token: &JoinToken,
        now_unix_ms: u64,
    ) -> std::result::Result<(), JoinTokenRefusal> {
        let matches: bool = self
            .secret_blake3
            .as_bytes()
            .ct_eq(token.secret_hash().as_bytes())
            .into();
        if self.token_id != token.token_id || !matches {
            return Err(JoinTokenRefusal::WrongSecret);
        }
        if self.used_at_unix_ms.is_some() {
            return Err(JoinTokenRefusal::AlreadyUsed {
                used_by_node_id: self.used_by_node_id,
            });
        }
        if now_unix_ms >= self.expires_at_unix_ms {
            return Err(JoinTokenRefusal::Expired);
        }
        Ok(())
    }

    /// The record after redemption by `node_id`.
    pub fn redeemed(&self, node_id: u64, now_unix_ms: u64) -> JoinTokenRecord {
        JoinTokenRecord {
            used_at_unix_ms: Some(now_unix_ms),
            used_by_node_id: Some(node_id),
            ..self.clone()
        }
    }
}

/// What the cluster records of each admitted host (`cluster/hosts/<node id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// [`CLUSTER_RECORD_FORMAT_VERSION`].
    pub format_version: u32,
    /// Raft node id.
    pub node_id: u64,
    /// Operator-facing host name.
    pub host_name: String,
    /// Address of its cluster (raft) listener.
    pub raft_address: String,
    /// SHA-256 of its certificate.
    pub certificate_fingerprint: String,
    /// When it was admitted.
    pub joined_at_unix_ms: u64,
}

fn host_key(node_id: u64) -> String {
    format!("{HOST_KEY_PREFIX}{node_id:020}")
}

fn decode_record<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|error| ClusterError::InvalidRecord {
        key: key.to_string(),
        reason: error.to_string(),
    })
}

fn encode_record<T: Serialize>(key: &str, record: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|error| ClusterError::InvalidRecord {
        key: key.to_string(),
        reason: error.to_string(),
    })
}

/// Creates a token valid for `lifetime` and stores its record; returns the token (print it
/// once: the cluster cannot show it again).
pub async fn create_join_token(
    cluster: &ClusterStore,
    ca_fingerprint: Fingerprint,
    lifetime: Duration,
) -> Result<JoinToken> {
    let (token, record) = issue_join_token(ca_fingerprint, lifetime, now_unix_millis())?;
    let key = format!("{JOIN_TOKEN_KEY_PREFIX}{}", token.token_id);
    let value = encode_record(&key, &record)?;
    cluster
        .transaction(Transaction::new().when_absent(key.clone()).put(key, value))
        .await?
        .into_result()?;
    Ok(token)
}

/// Every token record (used, unused and expired), for `cluster token list`.
pub async fn list_join_tokens(cluster: &ClusterStore) -> Result<Vec<JoinTokenRecord>> {
    let listing = cluster
        .list(JOIN_TOKEN_KEY_PREFIX, Consistency::Linearizable)
        .await?;
    listing
        .items
        .iter()
        .map(|item| decode_record(&item.key, &item.value))
        .collect()
}

/// A token's record and its revision, read through the leader.
async fn read_join_token(
    cluster: &ClusterStore,
    token: &JoinToken,
) -> Result<(JoinTokenRecord, u64)> {
    let key = format!("{JOIN_TOKEN_KEY_PREFIX}{}", token.token_id);
    let item = cluster
        .get(&key, Consistency::Linearizable)
        .await?
        .ok_or_else(|| ClusterError::JoinTokenRefused {
            token_id: token.token_id.clone(),
            reason: JoinTokenRefusal::Unknown.to_string(),
        })?;
    Ok((decode_record(&key, &item.value)?, item.mod_revision))
}

/// Redeems `token` for `node_id`: checks it and marks it used, atomically.
pub async fn redeem_join_token(
    cluster: &ClusterStore,
    token: &JoinToken,
    node_id: u64,
) -> Result<()> {
    let refused = |reason: JoinTokenRefusal| ClusterError::JoinTokenRefused {
        token_id: token.token_id.clone(),
        reason: reason.to_string(),
    };
    let key = format!("{JOIN_TOKEN_KEY_PREFIX}{}", token.token_id);
    let (record, mod_revision) = read_join_token(cluster, token).await?;
    let now = now_unix_millis();
    record.check(token, now).map_err(refused)?;
    let value = encode_record(&key, &record.redeemed(node_id, now))?;
    let outcome = cluster
        .transaction(
            Transaction::new()
                .when_mod_revision(key.clone(), mod_revision)
                .put(key, value),
        )
        .await?;
    if !outcome.succeeded {
        // Someone else changed the record since it was read: another joiner won the race.
        return Err(refused(JoinTokenRefusal::AlreadyUsed {
            used_by_node_id: None,
        }));
    }
    Ok(())
}

/// Hands out a node id never used before in this cluster (ids are never reused: raft would
/// mistake a new host for an old one). `at_least` is one more than the highest id in use when
/// the counter does not exist yet.
pub async fn allocate_node_id(cluster: &ClusterStore, at_least: u64) -> Result<u64> {
    loop {
        let current = cluster
            .get(NEXT_NODE_ID_KEY, Consistency::Linearizable)
            .await?;
        let (next, condition) = match &current {
            Some(item) => {
                let text = String::from_utf8_lossy(&item.value).to_string();
                let stored: u64 = text.parse().map_err(|_| ClusterError::InvalidRecord {
                    key: NEXT_NODE_ID_KEY.into(),
                    reason: format!("{text:?} is not a node id"),
                })?;
                (
                    stored.max(at_least),
                    Transaction::new().when_mod_revision(NEXT_NODE_ID_KEY, item.mod_revision),
                )
            }
            None => (at_least, Transaction::new().when_absent(NEXT_NODE_ID_KEY)),
        };
        let outcome = cluster
            .transaction(condition.put(NEXT_NODE_ID_KEY, (next + 1).to_string().into_bytes()))
            .await?;
        if outcome.succeeded {
            return Ok(next);
        }
    }
}

/// Records an admitted host.
pub async fn record_host(cluster: &ClusterStore, record: &HostRecord) -> Result<()> {
    let key = host_key(record.node_id);
    let value = encode_record(&key, record)?;
    cluster
        .transaction(Transaction::new().put(key, value))
        .await?;
    Ok(())
}

/// One host's record, read through the leader.
pub async fn host_record(cluster: &ClusterStore, node_id: u64) -> Result<Option<HostRecord>> {
    let key = host_key(node_id);
    match cluster.get(&key, Consistency::Linearizable).await? {
        Some(item) => Ok(Some(decode_record(&key, &item.value)?)),
        None => Ok(None),
    }
}

/// Every recorded host, by node id.
pub async fn list_hosts(cluster: &ClusterStore) -> Result<Vec<HostRecord>> {
    let listing = cluster
        .list(HOST_KEY_PREFIX, Consistency::Linearizable)
        .await?;
    listing
        .items
        .iter()
        .map(|item| decode_record(&item.key, &item.value))
        .collect()
}

/// Deletes a host's record (after it left the raft membership).
pub async fn forget_host(cluster: &ClusterStore, node_id: u64) -> Result<bool> {
    let outcome = cluster
        .transaction(Transaction::new().delete(host_key(node_id)))
        .await?;
    Ok(outcome.deleted_keys > 0)
}

/// A joining host's request: the token it was given, its CSR, where its raft listener is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token text.
    pub token: String,
    /// The CSR (PEM) from [`crate::NodeEnrolment`].
    pub csr_pem: String,
    /// Operator-facing host name.
    pub host_name: String,
    /// Address its raft listener will be reachable at.
    pub raft_address: String,
}

/// The cluster's answer: the node id, the signed certificate and the CA certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinGrant {
    /// The node that admitted the host (its certificate names it): ask it, with the new
    /// certificate, to add the host as a learner.
    pub admitted_by_node_id: u64,
    /// The joiner's raft node id.
    pub node_id: u64,
    /// Its certificate (PEM).
    pub certificate_pem: String,
    /// The cluster CA certificate (PEM); the joiner checks it against the token's fingerprint.
    pub ca_certificate_pem: String,
    /// The region's raft timing, if one was stored: the joiner writes it to its data directory
    /// ([`crate::timing::write_timing_file`]) before it opens its store.
    #[serde(default)]
    pub raft_timing: Option<crate::timing::RaftTimingRecord>,
}

/// Admits a host: checks the token pins this cluster's CA, redeems it, allocates a node id,
/// signs the CSR and records the host. Adding the host to raft (as a learner, once its
/// listener serves with the new certificate) is the caller's next step; the voter policy
/// promotes it later.
pub async fn admit_host(
    cluster: &ClusterStore,
    ca: &ClusterCa,
    request: &JoinRequest,
) -> Result<JoinGrant> {
    let token: JoinToken = request.token.parse()?;
    if token.ca_fingerprint != ca.fingerprint() {
        return Err(ClusterError::JoinTokenRefused {
            token_id: token.token_id.clone(),
            reason: JoinTokenRefusal::OtherCluster.to_string(),
        });
    }
    if request.raft_address.is_empty() || request.host_name.is_empty() {
        return Err(ClusterError::Membership {
            reason: "a joining host must give its host name and raft address".into(),
        });
    }
    // Check the CSR before the token is spent, so a malformed request does not burn it.
    ca.sign_node_certificate(&request.csr_pem, 0)?;
    let membership = cluster.store().metrics().membership;
    let highest = membership
        .voters
        .iter()
        .chain(membership.learners.iter())
        .copied()
        .max()
        .unwrap_or(0);
    // Check the token before an id is spent on the host (ids are never reused; a refused
    // joiner should not leave a gap). `redeem_join_token` checks again, atomically.
    let (record, _) = read_join_token(cluster, &token).await?;
    record
        .check(&token, now_unix_millis())
        .map_err(|reason| ClusterError::JoinTokenRefused {
            token_id: token.token_id.clone(),
            reason: reason.to_string(),
        })?;
    let node_id = allocate_node_id(cluster, highest + 1).await?;
    redeem_join_token(cluster, &token, node_id).await?;
    let certificate_pem = ca.sign_node_certificate(&request.csr_pem, node_id)?;
    let certificate_der = crate::identity::certificate_der_from_pem(&certificate_pem)?;
    record_host(
        cluster,
        &HostRecord {
            format_version: CLUSTER_RECORD_FORMAT_VERSION,
            node_id,
            host_name: request.host_name.clone(),
            raft_address: request.raft_address.clone(),
            certificate_fingerprint: Fingerprint::of_certificate(certificate_der.as_ref())
                .to_string(),
            joined_at_unix_ms: now_unix_millis(),
        },
    )
    .await?;
    Ok(JoinGrant {
        admitted_by_node_id: cluster.node_id(),
        node_id,
        certificate_pem,
        ca_certificate_pem: ca.certificate_pem(),
        raft_timing: crate::timing::load_raft_timing(cluster).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint() -> Fingerprint {
        Fingerprint([7; 32])
    }

    #[test]
    fn a_token_round_trips_through_its_text_and_hides_its_secret() {
        let (token, record) =
            issue_join_token(fingerprint(), Duration::from_secs(60), 1_000).expect("issue");
        let text = token.to_string();
        assert!(text.starts_with("ncjoin1."), "{text}");
        let parsed: JoinToken = text.parse().expect("parse");
        assert_eq!(parsed, token);
        assert!(!format!("{token:?}").contains(text.rsplit('.').next().unwrap()));
        assert!(
            !serde_json::to_string(&record)
                .unwrap()
                .contains(text.rsplit('.').next().unwrap())
        );
        assert_eq!(record.expires_at_unix_ms, 61_000);
        assert_eq!(record.check(&parsed, 1_001), Ok(()));
    }

    #[test]
    fn expired_used_and_wrong_tokens_are_refused() {
        let (token, record) =
            issue_join_token(fingerprint(), Duration::from_secs(60), 1_000).expect("issue");
        assert_eq!(record.check(&token, 61_000), Err(JoinTokenRefusal::Expired));
        let used = record.redeemed(5, 2_000);
        assert_eq!(
            used.check(&token, 2_001),
            Err(JoinTokenRefusal::AlreadyUsed {
                used_by_node_id: Some(5)
            })
        );
        let (other, _) =
            issue_join_token(fingerprint(), Duration::from_secs(60), 1_000).expect("issue");
        let forged = JoinToken {
            token_id: token.token_id.clone(),
            ..other
        };
        assert_eq!(
            record.check(&forged, 1_001),
            Err(JoinTokenRefusal::WrongSecret)
        );
    }

    #[test]
    fn lifetimes_are_bounded() {
        assert!(issue_join_token(fingerprint(), Duration::ZERO, 0).is_err());
        assert!(
            issue_join_token(
                fingerprint(),
                MAX_JOIN_TOKEN_LIFETIME + Duration::from_secs(1),
                0
            )
            .is_err()
        );
    }

    #[test]
    fn malformed_token_text_is_refused_with_a_reason() {
        let (token, _) =
            issue_join_token(fingerprint(), Duration::from_secs(60), 0).expect("issue");
        let text = token.to_string();
        let cases = [
            String::new(),
            "ncjoin1.abc".to_string(),
            text.replacen("ncjoin1", "ncjoin2", 1),
            text.replacen(".", ".zz", 1),
            format!("{text}x"),
            text.replace(&token.token_id, "short"),
        ];
        for case in cases {
            let error = case.parse::<JoinToken>().expect_err(&case);
            assert!(
                matches!(error, ClusterError::InvalidJoinToken { .. }),
                "{case}: {error}"
            );
        }
    }
}

/// One line of `cluster list`: what the cluster recorded of a host and its raft role as this
/// node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSummary {
    /// The host's record.
    pub record: HostRecord,
    /// `leader`, `voter`, `learner`, or `not_member` (admitted but not added yet, or removed).
    pub role: String,
    /// On the leader: the highest log index known replicated to the host.
    pub replicated_index: Option<u64>,
    /// The leader's last log index, to compare with `replicated_index`.
    pub leader_last_log_index: Option<u64>,
}

/// Every recorded host with its role, for `cluster list` (health and capacity come from the
/// agents' heartbeats, which live elsewhere).
pub async fn host_summaries(cluster: &ClusterStore) -> Result<Vec<HostSummary>> {
    let hosts = list_hosts(cluster).await?;
    let metrics = cluster.store().metrics();
    let leads = metrics.leader_id == Some(metrics.node_id);
    Ok(hosts
        .into_iter()
        .map(|record| {
            let node_id = record.node_id;
            let role = if metrics.leader_id == Some(node_id) {
                "leader"
            } else if metrics.membership.voters.contains(&node_id) {
                "voter"
            } else if metrics.membership.learners.contains(&node_id) {
                "learner"
            } else {
                "not_member"
            };
            HostSummary {
                role: role.to_string(),
                replicated_index: if leads {
                    metrics.replication.get(&node_id).copied().flatten()
                } else {
                    None
                },
                leader_last_log_index: if leads { metrics.last_log_index } else { None },
                record,
            }
        })
        .collect())
}
