//! `fincrypt mediator`: a node that keeps its clients' escrow, places,
//! audits and pays for them (see `fincrypt_market::mediator`), in the
//! foreground until SIGTERM or SIGINT.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use fincrypt_market::mediator::{Mediator, Rules};
use fincrypt_market::owner::OwnerSettings;
use fincrypt_market::wallet::{BitcoinRpc, Payments};
use fincrypt_net::{ErrorCode, Handler, Multiaddr, Node, NodeConfig, PeerId, Request, Response};
use futures::future::BoxFuture;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::Home;
use crate::control::{self, Answer};

/// Confirmations a deposit needs before it counts in an escrow.
pub const MIN_CONF: u32 = 1;

/// What `fincrypt mediator` was asked to do.
pub struct MediatorArgs {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to join the network through.
    pub bootstrap: Vec<Multiaddr>,
    /// The fee, in percent of what is paid for a client.
    pub fee_percent: f64,
    /// When some: the only clients served.
    pub accept_clients: Option<Vec<PeerId>>,
    /// Clients never served.
    pub deny_clients: Vec<PeerId>,
    /// When some: the only holders placed on.
    pub accept_holders: Option<Vec<PeerId>>,
    /// Holders never placed on.
    pub deny_holders: Vec<PeerId>,
    /// No new blocks go to a holder with a lower audit score.
    pub min_audit_score: f64,
    /// No new placements for a client whose escrow pays for fewer periods.
    pub min_escrow_periods: u64,
    /// A client whose escrow pays for fewer periods is told it is low.
    pub grace_periods: u64,
    /// A holder answering no audit for this many periods is gone.
    pub unreachable_periods: u64,
    /// Prices, periods, challenges and payouts (the owner's settings).
    pub settings: OwnerSettings,
    /// The Bitcoin node's wallet.
    pub bitcoin: Option<fincrypt_market::wallet::RpcSettings>,
}

/// The fee in hundredths of a percent; refuses what is not a percentage.
pub fn fee_basis_points(percent: f64) -> Result<u32> {
    if !(0.0..=100.0).contains(&percent) {
        bail!("a fee of {percent}% is not between 0 and 100");
    }
    Ok((percent * 100.0).round() as u32)
}

/// Answers clients' `Mediate` requests; a mediator keeps no blocks.
struct Mediating(Arc<Mediator<BitcoinRpc>>);

impl Handler for Mediating {
    fn handle(
        &self,
        peer: PeerId,
        request: fincrypt_net::codec::InboundRequest,
    ) -> BoxFuture<'static, Response> {
        let m = self.0.clone();
        Box::pin(async move {
            match request {
                Ok(Request::Mediate { message }) => match m.answer(&peer, &message).await {
                    Ok(answer) => Response::Mediated {
                        message: answer.into(),
                    },
                    Err(e) => {
                        tracing::error!(%peer, error = %e, "cannot encode an answer");
                        Response::Error(ErrorCode::Unavailable)
                    }
                },
                Ok(_) => Response::Error(ErrorCode::refused(
                    "this is a mediator: it keeps no blocks and makes no offers",
                )),
                Err(e) => Response::Error(e.to_code()),
            }
        })
    }
}

/// Runs a mediator until SIGTERM or SIGINT.
pub fn mediator(home: &Home, args: MediatorArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(home, args))
}

async fn run(home: &Home, args: MediatorArgs) -> Result<()> {
    if args.listen.is_empty() {
        bail!("mediator needs at least one --listen address");
    }
    let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let Some(rpc) = &args.bitcoin else {
        bail!(
            "a mediator keeps its clients' escrow in a Bitcoin wallet: set bitcoin_rpc_url \
             (with its login) in the config or FINCRYPT_BITCOIN_RPC_URL"
        );
    };
    let wallet = BitcoinRpc::new(rpc)?;
    wallet
        .balance()
        .await
        .context("the mediator's Bitcoin node does not answer")?;
    let rules = Rules {
        accept_clients: args
            .accept_clients
            .map(|a| a.into_iter().collect::<HashSet<_>>()),
        deny_clients: args.deny_clients.into_iter().collect(),
        accept_holders: args
            .accept_holders
            .map(|a| a.into_iter().collect::<HashSet<_>>()),
        deny_holders: args.deny_holders.into_iter().collect(),
        min_audit_score: args.min_audit_score,
        min_escrow_periods: args.min_escrow_periods,
        grace_periods: args.grace_periods,
        unreachable_periods: args.unreachable_periods,
        fee_basis_points: fee_basis_points(args.fee_percent)?,
        min_conf: MIN_CONF,
    };
    let mut settings = args.settings;
    if settings.max_price == 0 {
        // The holders' own prices decide, the lowest first.
        settings.max_price = u64::MAX;
    }
    std::fs::create_dir_all(&home.data_dir)
        .with_context(|| format!("creating {}", home.data_dir.display()))?;
    let mut config = NodeConfig::with_key_file(&home.node_key_file())?;
    let mediator = Arc::new(
        Mediator::open(
            &home.mediator_file(),
            &home.market_ledger_file(),
            wallet,
            rules,
            config.keypair.clone(),
            settings,
        )
        .with_context(|| format!("opening {}", home.mediator_file().display()))?,
    );
    config.listen = args.listen;
    config.bootstrap = args.bootstrap;
    let node = Node::start(config, Some(Arc::new(Mediating(mediator.clone())))).await?;
    mediator.attach(node.client());
    let peer = node.peer_id();
    let ticks = tokio::spawn(tick_until_stopped(mediator.clone()));
    let listen: Vec<String> = node
        .listen_addrs()
        .iter()
        .map(|a| format!("{a}/p2p/{peer}"))
        .collect();
    eprintln!("fincrypt mediator: peer {peer}, fee {}%", args.fee_percent);
    for a in &listen {
        eprintln!("fincrypt mediator: listening on {a}");
    }

    let socket = control::socket_path(&home.data_dir);
    let (runtime, m) = (tokio::runtime::Handle::current(), mediator.clone());
    let answer = move |req: control::Request| -> Result<Answer> {
        match req {
            control::Request::Status => Ok(Answer::Status(Box::new(control::Status {
                role: "mediator".into(),
                env_file: crate::config::env_file(),
                peer_id: Some(peer.to_string()),
                listen_addrs: listen.clone(),
                clients: Some(m.client_count()?),
                ..Default::default()
            }))),
            control::Request::MediatorClients => {
                Ok(Answer::Escrows(runtime.block_on(m.escrows())?))
            }
            control::Request::MediatorHolders => Ok(Answer::Holders(m.holders()?)),
            control::Request::MediatorPeriods => Ok(Answer::Settlements(m.settlements()?)),
            _ => bail!(
                "this is a mediator (fincrypt mediator): it has no filesystem and keeps no blocks"
            ),
        }
    };
    control::serve_until_stopped(&socket, answer, "mediator", &mut term, &mut int).await;
    ticks.abort();
    node.shutdown().await;
    Ok(())
}

/// Audits, settles and tells holders, several times a period. A round that
/// fails is logged and the next one tries again.
async fn tick_until_stopped(mediator: Arc<Mediator<BitcoinRpc>>) {
    let every = mediator.tick_every();
    loop {
        tokio::time::sleep(every).await;
        match mediator.tick().await {
            Ok(audits) => tracing::debug!(audits, "a mediator round"),
            Err(e) => tracing::warn!(error = %e, "a mediator round failed"),
        }
    }
}
