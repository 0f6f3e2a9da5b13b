//! `biogate client ...`: talk to a running server through the typed client.

use biogate::error::{Error, Result};
use biogate::npy::read_matrix;
use biogate::template::Dtype;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct ClientArgs {
    /// Server address.
    #[arg(long, env = "BIOGATE_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Bearer token.
    #[arg(long, env = "BIOGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate; enables TLS.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long)]
    client_key: Option<PathBuf>,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Subcommand)]
pub(crate) enum ClientCommand {
    /// Identify probes; one JSON line per probe.
    Identify {
        #[arg(long, default_value = "default")]
        gallery: String,
        #[arg(long)]
        probes: PathBuf,
        #[arg(short, default_value_t = 10)]
        k: u32,
        #[arg(long, allow_negative_numbers = true)]
        threshold: Option<f32>,
    },
    /// Verify one probe (a row of a .npy) against a claimed subject.
    Verify {
        #[arg(long, default_value = "default")]
        gallery: String,
        #[arg(long)]
        probes: PathBuf,
        #[arg(long, default_value_t = 0)]
        row: usize,
        #[arg(long)]
        subject: String,
        #[arg(long, allow_negative_numbers = true)]
        threshold: Option<f32>,
    },
    /// Enroll templates (.npy) with one subject id per row.
    Enroll {
        #[arg(long, default_value = "default")]
        gallery: String,
        #[arg(long)]
        templates: PathBuf,
        #[arg(long)]
        ids: PathBuf,
    },
    /// List galleries.
    Galleries,
    /// Create a gallery.
    CreateGallery {
        name: String,
        #[arg(long, required_unless_present = "source")]
        dim: Option<u32>,
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
        /// Derive it from this gallery: copy the templates of the subjects listed in
        /// --subjects (a flight's gallery from the master).
        #[arg(long, requires = "subjects", conflicts_with = "dim")]
        source: Option<String>,
        /// Text file, one subject id per line, each once (with --source).
        #[arg(long, requires = "source")]
        subjects: Option<std::path::PathBuf>,
        /// Through a cluster's router: shards (subjects placed by a hash of their id).
        #[arg(long, default_value_t = 1, conflicts_with = "source")]
        shards: u32,
        /// Through a cluster's router: replicas of each shard (0: the router's default, 2).
        #[arg(long, default_value_t = 0, conflicts_with = "source")]
        replicas: u32,
    },
    /// Drop a gallery and delete its data.
    DropGallery { name: String },
    /// Repair a gallery on the server (one that is NOT_SERVING) without a restart.
    RepairGallery { name: String },
    /// Merge a gallery's segments into one, dropping deleted rows, while it serves
    /// (searches and enrollments go on).
    #[command(alias = "compact")]
    CompactGallery { name: String },
}

pub(crate) async fn run(a: ClientArgs) -> Result<()> {
    use biogate::client::{Client, ConnectOptions, remote_error};
    let options = ConnectOptions {
        addr: a.addr.clone(),
        token: a.token.clone(),
        ca_cert: a.ca_cert.clone(),
        client_cert: a.client_cert.clone(),
        client_key: a.client_key.clone(),
        domain: None,
    };
    let c = Client::connect(&options).await?;
    let rpc = remote_error;
    match a.command {
        ClientCommand::Identify {
            gallery,
            probes,
            k,
            threshold,
        } => {
            let (_, dim, values) = read_matrix(&probes)?;
            for (b, chunk) in values.chunks(256 * dim).enumerate() {
                let results = c.identify(&gallery, chunk, dim, k, threshold).await.map_err(rpc)?;
                for (i, r) in results.iter().enumerate() {
                    let candidates: Vec<_> = r
                        .candidates
                        .iter()
                        .map(|c| serde_json::json!({"subject": c.subject, "score": c.score}))
                        .collect();
                    let matched = if r.decided {
                        serde_json::json!(r.matched)
                    } else {
                        serde_json::Value::Null
                    };
                    outln!(
                        "{}",
                        serde_json::json!({"probe": b * 256 + i, "matched": matched, "candidates": candidates})
                    );
                }
            }
        }
        ClientCommand::Verify {
            gallery,
            probes,
            row,
            subject,
            threshold,
        } => {
            let (rows, dim, values) = read_matrix(&probes)?;
            if row >= rows {
                return Err(Error::invalid(format!(
                    "--row {row}: {} has {rows} rows",
                    probes.display()
                )));
            }
            let probe = &values[row * dim..(row + 1) * dim];
            let r = c.verify(&gallery, probe, &subject, threshold).await.map_err(rpc)?;
            let matched = if r.decided {
                serde_json::json!(r.matched)
            } else {
                serde_json::Value::Null
            };
            outln!("{}", serde_json::json!({"score": r.score, "matched": matched}));
        }
        ClientCommand::Enroll {
            gallery,
            templates,
            ids,
        } => {
            let (_, dim, values) = read_matrix(&templates)?;
            let ids = biogate::npy::read_ids(&ids)?;
            if ids.len() * dim != values.len() {
                return Err(Error::invalid(format!(
                    "{} ids for {} rows",
                    ids.len(),
                    values.len() / dim
                )));
            }
            let r = c.enroll(&gallery, &values, dim, &ids).await.map_err(rpc)?;
            outln!("enrolled {} subjects ({} templates) durably", r.subjects, r.templates);
        }
        ClientCommand::Galleries => {
            let galleries = c.list_galleries().await.map_err(rpc)?;
            outln!(
                "{:<24} {:>5} {:>5} {:>12} {:>12} {:>8}  state",
                "name",
                "dim",
                "dtype",
                "templates",
                "subjects",
                "backend"
            );
            for g in galleries {
                let why = if g.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", g.reason)
                };
                outln!(
                    "{:<24} {:>5} {:>5} {:>12} {:>12} {:>8}  {}{why}",
                    g.name,
                    g.dim,
                    g.dtype,
                    g.rows,
                    g.subjects,
                    g.backend,
                    g.state
                );
                // A cluster's gallery (through the router): each shard's replicas.
                for s in &g.shard_health {
                    let replicas: Vec<String> = s
                        .replicas
                        .iter()
                        .map(|r| {
                            let state = match (r.live, r.serving) {
                                (false, _) => "down",
                                (true, true) => "serving",
                                (true, false) => "catching up",
                            };
                            format!("{} {state} (applied {})", r.node, r.applied)
                        })
                        .collect();
                    outln!(
                        "  shard {:<4} committed {:<8} visible {:<8} {}",
                        s.shard,
                        s.committed,
                        s.visible,
                        replicas.join(", ")
                    );
                }
            }
        }
        ClientCommand::CreateGallery {
            name,
            dim,
            dtype,
            source,
            subjects,
            shards,
            replicas,
        } => match (source, subjects, dim) {
            (Some(source), Some(list), _) => {
                let ids = biogate::npy::read_ids(&list)?;
                let g = c.derive_gallery(&name, &source, &ids).await.map_err(rpc)?;
                outln!(
                    "created gallery {} from {source}: {} subjects ({} templates, dim {}, dtype {})",
                    g.name,
                    g.subjects,
                    g.rows,
                    g.dim,
                    g.dtype
                );
                if !g.missing_subjects.is_empty() {
                    outln!(
                        "{} listed subject(s) not in {source}: {}",
                        g.missing_subjects.len(),
                        g.missing_subjects.join(", ")
                    );
                }
            }
            (_, _, Some(dim)) => {
                let g = c
                    .create_sharded_gallery(&name, dim, dtype.name(), shards, replicas)
                    .await
                    .map_err(rpc)?;
                if g.shards > 0 {
                    outln!(
                        "created gallery {} (dim {}, dtype {}, {} shards x {} replicas)",
                        g.name,
                        g.dim,
                        g.dtype,
                        g.shards,
                        g.replicas
                    );
                } else {
                    outln!("created gallery {} (dim {}, dtype {})", g.name, g.dim, g.dtype);
                }
            }
            _ => unreachable!("clap requires --dim or --source with --subjects"),
        },
        ClientCommand::DropGallery { name } => {
            c.drop_gallery(&name).await.map_err(rpc)?;
            outln!("dropped gallery {name}");
        }
        ClientCommand::RepairGallery { name } => {
            let r = c.repair_gallery(&name).await.map_err(rpc)?;
            if r.clean && r.actions.is_empty() {
                outln!("gallery {name}: nothing to repair");
            }
            for a in &r.actions {
                outln!("did:   {a}");
            }
            for l in &r.lost {
                let who = if l.subject.is_empty() {
                    "unknown subjects".to_owned()
                } else {
                    format!("subject {:?}", l.subject)
                };
                outln!("lost:  {who}: {} ({})", l.what, l.file);
            }
            if let Some(g) = r.gallery {
                outln!(
                    "gallery {name} is now {}{}",
                    g.state,
                    if g.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", g.reason)
                    }
                );
            }
        }
        ClientCommand::CompactGallery { name } => {
            let r = c.compact_gallery(&name).await.map_err(rpc)?;
            outln!(
                "compacted {name}: kept {} rows, dropped {}, {} segment(s) -> {}",
                r.rows_kept,
                r.rows_dropped,
                r.segments_before,
                r.segments_after
            );
        }
    }
    Ok(())
}
