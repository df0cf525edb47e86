//! Fossil: the live Fincrypt filesystem over a block store, and its FUSE mount.
//!
//! [`Fossil`] is the filesystem itself and knows nothing of FUSE; [`fuse`]
//! translates kernel requests into its calls and its errors into errnos.

mod error;
pub mod export;
pub mod file;
pub mod fossil;
pub mod fuse;
pub mod import;
pub mod meta;
pub mod snapdir;
pub mod snapshot;
pub mod walk;

pub use error::FsError;
pub use fossil::{Attr, Caller, Fossil, Imported, SetAttr, SetTime};
pub use meta::{Kind, Meta, Time};
