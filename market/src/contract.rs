//! A contract between an owner node and a holder: the holder keeps the
//! blocks the owner places on it, and is paid `price` per GiB for every
//! period in which it proves it still holds them. The payer (the owner
//! itself, or a mediator paying for it) and the holder sign the same terms.

use libp2p::PeerId;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};

use crate::MarketError;
use crate::offer::check_address;
use crate::signed::{self, Signature};

/// Version of the contract's layout (2 added `carry`, 3 `payer`, 4 the
/// owner's `consent` to its payer; none before 4 was released).
pub const CONTRACT_VERSION: u8 = 4;
/// The largest encoded contract a node sends or reads.
pub const MAX_CONTRACT_LEN: usize = 1024;
const DOMAIN: &[u8] = b"fincrypt contract v4\0";
const CONSENT_DOMAIN: &[u8] = b"fincrypt consent v1\0";

/// What an owner signs to let another node pay for it: that node may make
/// contracts in the owner's name. Without it, a node could take an owner's
/// one contract at a holder and, by not paying, get the owner cut and its
/// blocks released.
#[derive(Serialize)]
struct Mandate<'a> {
    owner: &'a [u8],
    payer: &'a [u8],
}

/// The owner's consent that `payer` (a mediator) makes and pays contracts
/// for it: kept by the payer and put in every contract it proposes.
pub fn consent(owner: &Keypair, payer: &PeerId) -> Result<Signature, MarketError> {
    let owner_bytes = owner.public().to_peer_id().to_bytes();
    let payer_bytes = payer.to_bytes();
    signed::sign(
        owner,
        CONSENT_DOMAIN,
        &encode(&Mandate {
            owner: &owner_bytes,
            payer: &payer_bytes,
        })?,
    )
}

/// Checks `sig` is `owner`'s consent that `payer` pays for it.
pub fn check_consent(sig: &Signature, owner: &PeerId, payer: &PeerId) -> Result<(), MarketError> {
    let (o, p) = (owner.to_bytes(), payer.to_bytes());
    signed::verify(
        sig,
        owner,
        CONSENT_DOMAIN,
        &encode(&Mandate {
            owner: &o,
            payer: &p,
        })?,
        "the owner's consent to its payer",
    )
}

/// A contract's id: random, chosen by the owner.
pub type ContractId = [u8; 16];

/// What both sides agree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    /// [`CONTRACT_VERSION`].
    pub version: u8,
    /// The contract's id.
    pub id: ContractId,
    /// The paying node, as PeerId bytes.
    pub owner: Vec<u8>,
    /// The holding node, as PeerId bytes.
    pub holder: Vec<u8>,
    /// Satoshis per GiB held per period.
    pub price: u64,
    /// Unix seconds at which period 0 begins.
    pub start: u64,
    /// Periods the contract lasts at least.
    pub min_duration: u32,
    /// Length of a period, in seconds.
    pub period: u64,
    /// Where the holder is paid.
    pub payout: String,
    /// Satoshis the owner may leave unpaid: smaller dues wait for a later
    /// settlement, and once a holder's unpaid dues reach this they are paid
    /// at the next one. A holder counts periods as unpaid only beyond it.
    pub carry: u64,
    /// The node that pays, proposes and tells of payments, as PeerId
    /// bytes: empty when it is the owner, else a mediator paying for it.
    pub payer: Vec<u8>,
    /// When another node pays: the owner's signed consent to it
    /// ([`consent`]). None when the owner pays.
    pub consent: Option<Signature>,
}

/// Terms the payer signed, for the holder to accept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The terms.
    pub terms: Terms,
    /// The payer's signature of them.
    pub owner_sig: Signature,
}

/// Terms both sides signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contract {
    /// The terms.
    pub terms: Terms,
    /// The payer's signature of them.
    pub owner_sig: Signature,
    /// The holder's signature of them.
    pub holder_sig: Signature,
}

impl Terms {
    /// The owner.
    pub fn owner(&self) -> Result<PeerId, MarketError> {
        signed::peer(&self.owner, "contract owner")
    }

    /// The holder.
    pub fn holder(&self) -> Result<PeerId, MarketError> {
        signed::peer(&self.holder, "contract holder")
    }

    /// The node that pays: the owner, or the mediator that pays for it.
    pub fn payer(&self) -> Result<PeerId, MarketError> {
        if self.payer.is_empty() {
            self.owner()
        } else {
            signed::peer(&self.payer, "contract payer")
        }
    }

    /// The period that holds Unix time `now`, if the contract has begun.
    pub fn period_at(&self, now: u64) -> Option<u64> {
        now.checked_sub(self.start).map(|s| s / self.period)
    }

    /// When period `n` ends.
    pub fn period_end(&self, n: u64) -> u64 {
        self.start
            .saturating_add(n.saturating_add(1).saturating_mul(self.period))
    }

    /// Satoshis due for holding `bytes` through one period: price per GiB,
    /// pro rata, rounded down to the satoshi.
    pub fn due(&self, bytes: u64) -> u64 {
        self.due_at(self.price, bytes)
    }

    /// [`Terms::due`] at `rate` satoshis per GiB, never above the price (a
    /// floating payer's rate for a period).
    pub fn due_at(&self, rate: u64, bytes: u64) -> u64 {
        let due = (u128::from(rate.min(self.price)) * u128::from(bytes)) >> 30;
        u64::try_from(due).unwrap_or(u64::MAX)
    }

    fn check(&self) -> Result<(), MarketError> {
        if self.version != CONTRACT_VERSION {
            return Err(MarketError::Invalid(format!(
                "contract version {} is not supported (this program reads {CONTRACT_VERSION})",
                self.version
            )));
        }
        if self.period == 0 {
            return Err(MarketError::Invalid(
                "a contract's period is 0 seconds".into(),
            ));
        }
        let (owner, payer) = (self.owner()?, self.payer()?);
        if owner == self.holder()? || payer == self.holder()? {
            return Err(MarketError::Invalid(
                "a node cannot contract with itself".into(),
            ));
        }
        match &self.consent {
            None if payer != owner => {
                return Err(MarketError::Invalid(
                    "a contract paid by another node than its owner needs the owner's consent"
                        .into(),
                ));
            }
            None => {}
            Some(_) if payer == owner => {
                return Err(MarketError::Invalid(
                    "a contract the owner pays carries no consent".into(),
                ));
            }
            Some(sig) => check_consent(sig, &owner, &payer)?,
        }
        check_address(&self.payout, self.price > 0)
    }

    /// The payer's side: checks and signs the terms.
    pub fn propose(self, payer: &Keypair) -> Result<Proposal, MarketError> {
        self.check()?;
        if payer.public().to_peer_id() != self.payer()? {
            return Err(MarketError::Invalid(
                "a contract is proposed by the node that pays it".into(),
            ));
        }
        let owner_sig = signed::sign(payer, DOMAIN, &encode(&self)?)?;
        Ok(Proposal {
            terms: self,
            owner_sig,
        })
    }
}

impl Proposal {
    /// The holder's side: checks the owner's signature and countersigns.
    pub fn accept(self, holder: &Keypair) -> Result<Contract, MarketError> {
        self.terms.check()?;
        let bytes = encode(&self.terms)?;
        signed::verify(
            &self.owner_sig,
            &self.terms.payer()?,
            DOMAIN,
            &bytes,
            "contract",
        )?;
        if holder.public().to_peer_id() != self.terms.holder()? {
            return Err(MarketError::Invalid(
                "a contract is accepted by its holder".into(),
            ));
        }
        let holder_sig = signed::sign(holder, DOMAIN, &bytes)?;
        Ok(Contract {
            terms: self.terms,
            owner_sig: self.owner_sig,
            holder_sig,
        })
    }

    /// The bytes sent to the holder.
    pub fn encode(&self) -> Result<Vec<u8>, MarketError> {
        bounded(encode(self)?)
    }

    /// Reads a proposal and checks the owner's signature.
    pub fn decode(bytes: &[u8]) -> Result<Proposal, MarketError> {
        let p: Proposal = decode(bytes)?;
        p.terms.check()?;
        let b = encode(&p.terms)?;
        signed::verify(&p.owner_sig, &p.terms.payer()?, DOMAIN, &b, "contract")?;
        Ok(p)
    }
}

impl Contract {
    /// The bytes each side keeps and sends.
    pub fn encode(&self) -> Result<Vec<u8>, MarketError> {
        bounded(encode(self)?)
    }

    /// Reads a contract and checks both signatures.
    pub fn decode(bytes: &[u8]) -> Result<Contract, MarketError> {
        let c: Contract = decode(bytes)?;
        c.terms.check()?;
        let b = encode(&c.terms)?;
        signed::verify(&c.owner_sig, &c.terms.payer()?, DOMAIN, &b, "contract")?;
        signed::verify(&c.holder_sig, &c.terms.holder()?, DOMAIN, &b, "contract")?;
        Ok(c)
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, MarketError> {
    postcard::to_allocvec(v).map_err(|e| MarketError::Invalid(format!("cannot encode: {e}")))
}

fn bounded(bytes: Vec<u8>) -> Result<Vec<u8>, MarketError> {
    if bytes.len() > MAX_CONTRACT_LEN {
        return Err(MarketError::Invalid(format!(
            "a contract of {} bytes is over the {MAX_CONTRACT_LEN} allowed",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<T, MarketError> {
    postcard::from_bytes(&bounded(bytes.to_vec())?)
        .map_err(|e| MarketError::Invalid(format!("the contract does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn terms(owner: &Keypair, holder: &Keypair) -> Terms {
        Terms {
            version: CONTRACT_VERSION,
            id: [7; 16],
            owner: owner.public().to_peer_id().to_bytes(),
            holder: holder.public().to_peer_id().to_bytes(),
            price: 20,
            start: 1_000,
            min_duration: 24,
            period: 60,
            payout: "mj6mz6RpsSEJPmG1zzEf8nu3J9oV6ihxfB".into(),
            carry: 1000,
            payer: Vec::new(),
            consent: None,
        }
    }

    #[test]
    fn both_sides_sign_and_neither_can_change_the_terms_alone() {
        let (o, h) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let p = terms(&o, &h).propose(&o).unwrap();
        let p = Proposal::decode(&p.encode().unwrap()).unwrap();
        let c = p.clone().accept(&h).unwrap();
        assert_eq!(Contract::decode(&c.encode().unwrap()).unwrap(), c);

        // The holder raising the price, or the owner lowering it, after signing.
        let mut raised = c.clone();
        raised.terms.price = 21;
        assert!(Contract::decode(&raised.encode().unwrap()).is_err());
        let mut raised = p.clone();
        raised.terms.price = 21;
        assert!(
            raised.accept(&h).is_err(),
            "a proposal changed after the owner signed it"
        );
        // Someone else accepting, or proposing in the owner's name.
        assert!(p.clone().accept(&o).is_err());
        let stranger = Keypair::generate_ed25519();
        assert!(terms(&o, &h).propose(&stranger).is_err());
        assert!(
            terms(&o, &o).propose(&o).is_err(),
            "no contract with oneself"
        );
        let mut zero = terms(&o, &h);
        zero.period = 0;
        assert!(zero.propose(&o).is_err());

        let bytes = c.encode().unwrap();
        for n in 0..bytes.len() {
            assert!(Contract::decode(&bytes[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn a_mediator_may_pay_for_an_owner_and_it_alone_signs_for_it() {
        let (o, h, m) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        let mut t = terms(&o, &h);
        t.payer = m.public().to_peer_id().to_bytes();
        assert_eq!(t.payer().unwrap(), m.public().to_peer_id());
        assert!(
            t.clone().propose(&m).is_err(),
            "no contract in the owner's name without its consent"
        );
        let stranger = Keypair::generate_ed25519();
        t.consent = Some(consent(&stranger, &m.public().to_peer_id()).unwrap());
        assert!(t.clone().propose(&m).is_err(), "consent by another key");
        t.consent = Some(consent(&o, &stranger.public().to_peer_id()).unwrap());
        assert!(t.clone().propose(&m).is_err(), "consent to another payer");
        t.consent = Some(consent(&o, &m.public().to_peer_id()).unwrap());
        assert!(
            t.clone().propose(&o).is_err(),
            "the owner does not sign for its payer"
        );
        let c = t.clone().propose(&m).unwrap().accept(&h).unwrap();
        assert_eq!(Contract::decode(&c.encode().unwrap()).unwrap(), c);
        // The owner's signature in the payer's place does not verify.
        let mut forged = c.clone();
        forged.owner_sig = signed::sign(&o, DOMAIN, &encode(&c.terms).unwrap()).unwrap();
        assert!(Contract::decode(&forged.encode().unwrap()).is_err());
        // Nor may a holder pay for itself.
        let mut own = terms(&o, &h);
        own.payer = h.public().to_peer_id().to_bytes();
        own.consent = Some(consent(&o, &h.public().to_peer_id()).unwrap());
        assert!(own.propose(&h).is_err());
        // An owner paying itself carries no consent.
        let mut needless = terms(&o, &h);
        needless.consent = Some(consent(&o, &m.public().to_peer_id()).unwrap());
        assert!(needless.propose(&o).is_err());
    }

    #[test]
    fn periods_and_dues_are_exact() {
        let (o, h) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let t = terms(&o, &h);
        assert_eq!(t.period_at(999), None);
        assert_eq!(t.period_at(1_000), Some(0));
        assert_eq!(t.period_at(1_059), Some(0));
        assert_eq!(t.period_at(1_060), Some(1));
        assert_eq!(t.period_end(0), 1_060);
        assert_eq!(t.due(1 << 30), 20);
        assert_eq!(t.due(3 << 29), 30);
        assert_eq!(t.due((1 << 30) / 20 - 1), 0, "rounded down");
        assert_eq!(t.due(u64::MAX), 20 * (u64::MAX >> 30) + 19);
    }

    proptest! {
        #[test]
        fn garbage_is_refused_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            prop_assert!(Contract::decode(&bytes).is_err());
            prop_assert!(Proposal::decode(&bytes).is_err());
        }
    }
}
