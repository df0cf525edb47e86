//! Files copied in from outside the filesystem (`Fossil::import_file`, the
//! ground of watched folders): the contents stream into blocks, the file
//! changes in one step with its source's mode, owner, times and extended
//! attributes, a new version keeps the inode, and what is refused changes
//! nothing.

mod common;

use std::collections::BTreeMap;

use common::{mount, read_all};

use fincrypt_blockstore::MasterSecret;
use fincrypt_fs::{Caller, Imported, Kind, Time};

const WHO: Caller = Caller { uid: 0, gid: 0 };

/// Bytes that differ at every offset, and between seeds.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed).to_le_bytes()[i % 4])
        .collect()
}

fn attrs(perm: u16, mtime: i64) -> Imported {
    let mut xattrs = BTreeMap::new();
    xattrs.insert(b"user.origin".to_vec(), b"outside".to_vec());
    xattrs.insert(b"user.fincrypt.redundancy".to_vec(), b"9".to_vec());
    Imported {
        perm,
        uid: 1000,
        gid: 100,
        atime: Time {
            secs: mtime,
            nanos: 0,
        },
        mtime: Time {
            secs: mtime,
            nanos: 7,
        },
        xattrs,
    }
}

#[test]
fn an_imported_file_reads_back_with_its_attributes_and_a_new_version_keeps_its_inode() {
    let dir = tempfile::tempdir().unwrap();
    let keys = MasterSecret::generate().keys();
    let fs = mount(dir.path(), &keys);
    let first = pattern(9 << 20, 1);
    let a = fs
        .import_file(
            1,
            b"doc",
            &mut first.as_slice(),
            &attrs(0o640, 1_700_000_000),
        )
        .unwrap();
    assert_eq!(
        (a.kind, a.size, a.perm, a.uid, a.gid),
        (Kind::File, 9 << 20, 0o640, 1000, 100)
    );
    assert_eq!(a.mtime.secs, 1_700_000_000);
    assert_eq!(a.mtime.nanos, 7);
    assert_eq!(read_all(&fs, a.ino), first);
    assert_eq!(fs.getxattr(a.ino, b"user.origin").unwrap(), b"outside");
    assert!(
        fs.getxattr(a.ino, b"user.fincrypt.redundancy").is_err(),
        "a source's redundancy xattr is not taken"
    );

    // A hard link, then a new version: the same inode, seen through both names.
    fs.link(a.ino, 1, b"alias").unwrap();
    let second = pattern(3 << 20, 2);
    let b = fs
        .import_file(
            1,
            b"doc",
            &mut second.as_slice(),
            &attrs(0o600, 1_700_000_100),
        )
        .unwrap();
    assert_eq!(b.ino, a.ino);
    assert_eq!((b.size, b.perm, b.nlink), (3 << 20, 0o600, 2));
    let alias = fs.lookup(1, b"alias").unwrap();
    assert_eq!(read_all(&fs, alias.ino), second);

    // Durable once synced: a remount reads the new version.
    fs.sync_all().unwrap();
    drop(fs);
    let fs = mount(dir.path(), &keys);
    let again = fs.lookup(1, b"doc").unwrap();
    assert_eq!(read_all(&fs, again.ino), second);
}

/// A source that fails after some bytes.
struct Failing(usize);

impl std::io::Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EACCES));
        }
        let n = buf.len().min(self.0);
        buf[..n].fill(7);
        self.0 -= n;
        Ok(n)
    }
}

#[test]
fn an_import_that_cannot_finish_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keys = MasterSecret::generate().keys();
    let fs = mount(dir.path(), &keys);
    let old = pattern(1 << 20, 3);
    let a = fs
        .import_file(1, b"doc", &mut old.as_slice(), &attrs(0o644, 1))
        .unwrap();
    // A source that cannot be read to its end: the error, and the old version.
    let e = fs
        .import_file(1, b"doc", &mut Failing(5 << 20), &attrs(0o600, 2))
        .unwrap_err();
    assert_eq!(e.errno(), libc::EACCES);
    let now = fs.getattr(a.ino).unwrap();
    assert_eq!((now.size, now.perm), (1 << 20, 0o644));
    assert_eq!(read_all(&fs, a.ino), old);
    // Not over a directory, nor over a file with writes not yet sealed.
    fs.mknod(1, b"dir", Kind::Dir, 0o755, 0, None, WHO).unwrap();
    let e = fs
        .import_file(1, b"dir", &mut old.as_slice(), &attrs(0o644, 1))
        .unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    let open = fs.create(1, b"open", 0o644, WHO).unwrap();
    fs.write(open.ino, 0, b"unsealed").unwrap();
    let e = fs
        .import_file(1, b"open", &mut old.as_slice(), &attrs(0o644, 1))
        .unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY);
    assert_eq!(fs.read(open.ino, 0, 100).unwrap().as_ref(), b"unsealed");
    // Nor as `.snapshots` in the root.
    assert!(
        fs.import_file(1, b".snapshots", &mut old.as_slice(), &attrs(0o644, 1))
            .is_err()
    );
}
