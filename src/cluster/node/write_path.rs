//! A node's server: `serve --etcd` starts the server with this node as its write path
//! (`server::replication`), so every write to a replica goes through the shard's log
//! (commit.rs) and the server knows nothing of etcd.

use super::{ClusterOptions, Node};
use crate::cluster::batch::Op;
use crate::error::{Error, Result};
use crate::server::ServerHandle;
use crate::server::config::Config;
use crate::server::replication::{Joining, Pending, Replication, Write};
use std::sync::Arc;

/// Start serving `config` as a node of the cluster `options` name: the server listens,
/// then the node joins (registers its address, holds the replicas the shard map gives
/// it) and takes its writes.
pub async fn start_node(config: Config, options: ClusterOptions) -> Result<ServerHandle> {
    let join = move |joining: Joining| -> Pending<'static, Arc<dyn Replication>> {
        Box::pin(async move {
            let advertise = match &options.advertise {
                Some(a) => a.clone(),
                None if joining.addr.ip().is_unspecified() => {
                    return Err(Error::Config(format!(
                        "listening on {}: give --advertise HOST:PORT, the address other nodes and routers reach this one at",
                        joining.addr
                    )));
                }
                None => joining.addr.to_string(),
            };
            let node = Node::join(
                &options,
                advertise,
                joining.registry,
                &joining.data_dir,
                joining.seal_log_rows,
            )
            .await?;
            Ok(node as Arc<dyn Replication>)
        })
    };
    crate::server::start_replicated(config, Box::new(join)).await
}

impl Replication for Node {
    fn node_name(&self) -> &str {
        &self.name
    }

    fn commit<'a>(&'a self, local: &'a str, writes: Vec<Write>) -> Pending<'a, u64> {
        Box::pin(async move {
            let mut ops = Vec::with_capacity(writes.len());
            for w in writes {
                ops.push(match w {
                    Write::Enroll {
                        expires_at: Some(_), ..
                    } => {
                        return Err(Error::invalid(
                            "expires_at: a cluster's galleries do not expire subjects yet",
                        ));
                    }
                    Write::Enroll { enrollment, .. } => Op::Enroll {
                        subject: enrollment.subject,
                        templates: enrollment.templates,
                    },
                    Write::Delete { subject } => Op::Delete { subject },
                });
            }
            Node::commit(self, local, ops).await
        })
    }

    fn check_read(&self, local: &str, metadata: &tonic::metadata::MetadataMap) -> Result<()> {
        Node::check_read(self, local, metadata)
    }

    fn leave(&self) -> Pending<'_, ()> {
        Box::pin(async move {
            Node::leave(self).await;
            Ok(())
        })
    }
}
