//! Large writes are sealed in the background while new writes collect over
//! them: reads, overwrites and truncations in that window must see exactly
//! what was written, and the sealed file must survive a remount.

mod common;

use fincrypt_blockstore::MasterSecret;
use fincrypt_fs::{Caller, Fossil, SetAttr};

use common::mount;

const MIB: usize = 1 << 20;
const WHO: Caller = Caller { uid: 0, gid: 0 };

/// Bytes that differ at every offset and between passes.
fn pattern(offset: usize, len: usize, pass: u8) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ pass)
        .collect()
}

fn check(fs: &Fossil, ino: u64, model: &[u8], offset: usize, len: usize) {
    let got = fs.read(ino, offset as u64, len as u32).unwrap();
    let want = &model[offset.min(model.len())..(offset + len).min(model.len())];
    assert!(
        got.as_ref() == want,
        "{} bytes at {offset} differ from what was written",
        got.len()
    );
}

#[test]
fn writes_over_a_file_being_sealed_read_back_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let keys = MasterSecret::generate().keys();
    let fs = mount(dir.path(), &keys);
    let ino = fs.create(1, b"big", 0o644, WHO).unwrap().ino;
    let mut model: Vec<u8> = Vec::new();
    let write = |fs: &Fossil, model: &mut Vec<u8>, offset: usize, data: &[u8]| {
        assert_eq!(fs.write(ino, offset as u64, data).unwrap(), data.len());
        if model.len() < offset + data.len() {
            model.resize(offset + data.len(), 0);
        }
        model[offset..offset + data.len()].copy_from_slice(data);
    };

    // 72 MiB in 1 MiB writes: several buffers fill and are handed off.
    for i in 0..72 {
        write(&fs, &mut model, i * MIB, &pattern(i * MIB, MIB, 0));
        // Read back what the last buffers held (sealed, in flight or fresh),
        // across their edges.
        if i >= 20 {
            for back in [1, 15, 17, 19] {
                check(&fs, ino, &model, (i - back) * MIB + 12_345, MIB);
            }
        }
        match i {
            // Overwrite sealed bytes and bytes of the buffer being sealed.
            30 => write(&fs, &mut model, 3 * MIB + 7, &pattern(0, 2 * MIB, 1)),
            40 => write(&fs, &mut model, 22 * MIB + 99, &pattern(0, 20 * MIB, 2)),
            // Cut into the buffer being sealed, then write on past a hole.
            50 => {
                let size = 45 * MIB + 3;
                fs.setattr(
                    ino,
                    SetAttr {
                        size: Some(size as u64),
                        ..Default::default()
                    },
                )
                .unwrap();
                model.truncate(size);
                write(&fs, &mut model, 51 * MIB, &pattern(51 * MIB, MIB, 3));
            }
            _ => {}
        }
    }
    assert_eq!(fs.getattr(ino).unwrap().size, model.len() as u64);
    for at in (0..model.len()).step_by(4 * MIB) {
        check(&fs, ino, &model, at, 4 * MIB);
    }
    fs.release(ino).unwrap();
    assert_eq!(fs.dirty_bytes(), 0, "unsealed bytes left after close");
    drop(fs);

    let fs = mount(dir.path(), &keys);
    assert_eq!(fs.getattr(ino).unwrap().size, model.len() as u64);
    for at in (0..model.len()).step_by(4 * MIB) {
        check(&fs, ino, &model, at, 4 * MIB);
    }
}
