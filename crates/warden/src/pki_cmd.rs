//! `warden pki …`: the offline certificate authority (see docs/pki.md and the `warden-pki`
//! crate). Nothing here talks to the daemon; it reads and writes the PKI directory only.

use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use warden_pki::{CertInfo, IssueOptions, Kind, Pki};

#[derive(Args)]
pub struct PkiArgs {
    /// The PKI directory [default: /etc/warden/pki]
    #[arg(long, global = true, env = "WARDEN_PKI_DIR")]
    pub dir: Option<PathBuf>,
    /// Print machine-readable JSON
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: PkiCommand,
}

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create the self-signed CA (ECDSA P-384, ecdsa-with-SHA384), an empty CRL and index
    Init {
        /// The CA's common name
        #[arg(long, default_value = "warden CA")]
        cn: String,
        /// Validity in days [default: 3650]
        #[arg(long)]
        days: Option<u32>,
        /// Replace an existing CA (everything it signed stops verifying)
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate and key signed by the CA
    Issue {
        #[command(subcommand)]
        kind: IssueKind,
    },
    /// Revoke the certificate(s) issued under NAME, or the one with SERIAL (hex), and re-sign
    /// the CRL
    Revoke {
        #[arg(value_name = "NAME|SERIAL")]
        what: String,
    },
    /// Re-sign the CRL with a fresh next-update (run it from a timer)
    Crl {
        /// Days until the CRL's next-update [default: 30]
        #[arg(long)]
        days: Option<u32>,
    },
    /// Every issued certificate: name, kind, serial, not-after, revoked, client identity
    List,
    /// Print the client identity of any certificate file (PEM)
    Identity { cert: PathBuf },
}

#[derive(Args)]
pub struct IssueCommon {
    /// The certificate's name: its CN and the file name under issued/
    pub name: String,
    /// Validity in days [default: server 365, client 90]
    #[arg(long)]
    pub days: Option<u32>,
    /// Replace an existing certificate of that name (the old one stays valid until revoked)
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand)]
pub enum IssueKind {
    /// A server certificate (EKU serverAuth) for the names given with --san
    Server {
        #[command(flatten)]
        common: IssueCommon,
        /// A DNS name or IP address the server answers on (repeat for several)
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
    },
    /// A client certificate (CN=NAME, EKU clientAuth); prints its identity
    Client {
        #[command(flatten)]
        common: IssueCommon,
    },
}

pub fn dispatch(args: PkiArgs) -> anyhow::Result<i32> {
    let dir = args
        .dir
        .unwrap_or_else(|| PathBuf::from(warden_pki::DEFAULT_DIR));
    let pki = Pki::new(&dir);
    let json = args.json;
    match args.command {
        PkiCommand::Init { cn, days, force } => {
            let ca = pki.init(&cn, days, force)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ca)?);
            } else {
                println!(
                    "CA {:?} created in {}: {} (key {}), valid until {}, serial {}",
                    ca.cn,
                    dir.display(),
                    pki.path(warden_pki::CA_CERT).display(),
                    pki.path(warden_pki::CA_KEY).display(),
                    ca.not_after,
                    ca.serial
                );
            }
        }
        PkiCommand::Issue { kind } => {
            let (kind, common, sans) = match kind {
                IssueKind::Server { common, sans } => (Kind::Server, common, sans),
                IssueKind::Client { common } => (Kind::Client, common, Vec::new()),
            };
            let info = pki.issue(&IssueOptions {
                kind,
                name: common.name,
                sans,
                days: common.days,
                force: common.force,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let cert = pki.path(&info.cert);
                println!(
                    "{} certificate {:?}: {} (key {}), serial {}, valid until {}",
                    info.kind.as_str(),
                    info.name,
                    cert.display(),
                    cert.with_extension("key").display(),
                    info.serial,
                    info.not_after
                );
                if !info.sans.is_empty() {
                    println!("subject alternative names: {}", info.sans.join(", "));
                }
                if kind == Kind::Client {
                    println!("identity: {}", info.identity);
                }
            }
        }
        PkiCommand::Revoke { what } => {
            let revoked = pki.revoke(&what)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&revoked)?);
            } else {
                for c in &revoked {
                    println!(
                        "revoked {} {:?}, serial {}",
                        c.kind.as_str(),
                        c.name,
                        c.serial
                    );
                }
                println!("CRL re-signed: {}", pki.path(warden_pki::CRL).display());
            }
        }
        PkiCommand::Crl { days } => {
            pki.refresh_crl(days)?;
            println!("CRL re-signed: {}", pki.path(warden_pki::CRL).display());
        }
        PkiCommand::List => {
            let certs = pki.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&certs)?);
            } else {
                print!("{}", table(&certs));
            }
        }
        PkiCommand::Identity { cert } => {
            let pem =
                std::fs::read(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let id = warden_pki::client_identity_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", cert.display()))?;
            println!("{id}");
        }
    }
    Ok(0)
}

fn table(certs: &[CertInfo]) -> String {
    let mut out = format!(
        "{:<24} {:<6} {:<32} {:<20} {:<20} {}\n",
        "NAME", "KIND", "SERIAL", "NOT AFTER", "REVOKED", "IDENTITY"
    );
    for c in certs {
        out.push_str(&format!(
            "{:<24} {:<6} {:<32} {:<20} {:<20} {}\n",
            c.name,
            c.kind.as_str(),
            c.serial,
            c.not_after,
            c.revoked_at.as_deref().unwrap_or("-"),
            c.identity
        ));
    }
    out
}
