//! The FUSE adaptor: one call into [`Fossil`] and one reply per request, and
//! errno mapping. No filesystem logic lives here.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    AccessFlags, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow,
    WriteFlags,
};

use crate::FsError;
use crate::fossil::{Attr, Caller, Fossil, SetAttr, SetTime};
use crate::meta::Kind;

/// How long the kernel may cache attributes and names; this mount is their only writer.
const TTL: Duration = Duration::from_secs(1);

/// Mount settings.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    /// Let other users in, with the kernel checking permissions.
    pub allow_other: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// What `mount`, `df` and `findmnt` show as the source (the home's
    /// path, so two mounts can be told apart); `fincrypt` when empty or
    /// when it holds a comma, a space or a backslash, which mount options
    /// cannot carry.
    pub source: String,
    /// Mount read-only: the kernel refuses every change with EROFS.
    pub read_only: bool,
}

/// The kernel-facing side of a [`Fossil`].
pub struct FuseFs {
    fs: Arc<Fossil>,
}

impl FuseFs {
    /// Wraps a filesystem for mounting.
    pub fn new(fs: Arc<Fossil>) -> FuseFs {
        FuseFs { fs }
    }
}

/// Mounts `fs` at `mountpoint`; run the returned session to serve requests.
pub fn session(
    fs: Arc<Fossil>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> std::io::Result<fuser::Session<FuseFs>> {
    let mut config = Config::default();
    let plain = |c: char| c == ',' || c == '\\' || c.is_whitespace();
    let source = if opts.source.is_empty() || opts.source.contains(plain) {
        "fincrypt".to_owned()
    } else {
        opts.source.clone()
    };
    config.mount_options = vec![
        MountOption::FSName(source),
        MountOption::Subtype("fincrypt".into()),
        MountOption::DefaultPermissions,
    ];
    if opts.read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    fuser::Session::new(FuseFs::new(fs), mountpoint, &config)
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime.system(),
        mtime: a.mtime.system(),
        ctime: a.ctime.system(),
        crtime: a.crtime.system(),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn err(e: &FsError) -> Errno {
    if e.errno() == libc::EIO {
        tracing::warn!(error = %e, "filesystem operation failed");
    }
    Errno::from_i32(e.errno())
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t.into()),
    }
}

fn entry(reply: ReplyEntry, r: Result<Attr, FsError>) {
    match r {
        Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
        Err(e) => reply.error(err(&e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(&e)),
    }
}

fn opened(reply: ReplyOpen, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
        Err(e) => reply.error(err(&e)),
    }
}

fn xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, FsError>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(err(&e)),
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.sync_all() {
            tracing::error!(error = %e, "could not write everything back at unmount");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(reply, self.fs.lookup(parent.0, name.as_bytes()));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &attr(&a)),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(Into::into),
        };
        match self
            .fs
            .check_user_change(ino.0)
            .and_then(|()| self.fs.setattr(ino.0, set))
        {
            Ok(a) => reply.attr(&TTL, &attr(&a)),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let k = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return reply.error(Errno::from_i32(libc::EINVAL)),
        };
        entry(
            reply,
            self.fs.check_user_change(parent.0).and_then(|()| {
                self.fs.mknod(
                    parent.0,
                    name.as_bytes(),
                    k,
                    mode as u16,
                    rdev,
                    None,
                    caller(req),
                )
            }),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            self.fs.check_user_change(parent.0).and_then(|()| {
                self.fs.mknod(
                    parent.0,
                    name.as_bytes(),
                    Kind::Dir,
                    mode as u16,
                    0,
                    None,
                    caller(req),
                )
            }),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes();
        let r = self.fs.check_user_change_entry(parent.0, name);
        empty(reply, r.and_then(|()| self.fs.unlink(parent.0, name)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes();
        let r = self.fs.check_user_change_entry(parent.0, name);
        empty(reply, r.and_then(|()| self.fs.rmdir(parent.0, name)));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let t = target.as_os_str().as_bytes();
        entry(
            reply,
            self.fs.check_user_change(parent.0).and_then(|()| {
                self.fs.mknod(
                    parent.0,
                    link_name.as_bytes(),
                    Kind::Symlink,
                    0o777,
                    0,
                    Some(t),
                    caller(req),
                )
            }),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let r = self
            .fs
            .check_user_change_entry(parent.0, name.as_bytes())
            .and_then(|()| {
                self.fs
                    .check_user_change_entry(newparent.0, newname.as_bytes())
            });
        empty(
            reply,
            r.and_then(|()| {
                self.fs.rename(
                    parent.0,
                    name.as_bytes(),
                    newparent.0,
                    newname.as_bytes(),
                    noreplace,
                    exchange,
                )
            }),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self
            .fs
            .check_user_change(ino.0)
            .and_then(|()| self.fs.check_user_change(newparent.0));
        entry(
            reply,
            r.and_then(|()| self.fs.link(ino.0, newparent.0, newname.as_bytes())),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let r = if writes {
            self.fs.check_user_change(ino.0)
        } else {
            Ok(())
        };
        opened(reply, r.and_then(|()| self.fs.open(ino.0)));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.flush(ino.0));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.release(ino.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.fsync(ino.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        opened(reply, self.fs.open(ino.0));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir(ino.0, offset, 256) {
            Ok(entries) => {
                for (next, d) in entries {
                    if reply.add(
                        INodeNo(d.ino),
                        next,
                        kind(d.kind),
                        OsStr::from_bytes(&d.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(err(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.release(ino.0));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.sync_meta());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                crate::fossil::NAME_MAX as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let create = flags & libc::XATTR_CREATE != 0;
        let replace = flags & libc::XATTR_REPLACE != 0;
        empty(
            reply,
            self.fs.check_user_change(ino.0).and_then(|()| {
                self.fs
                    .setxattr(ino.0, name.as_bytes(), value, create, replace)
            }),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr(reply, size, self.fs.getxattr(ino.0, name.as_bytes()));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr(reply, size, self.fs.listxattr(ino.0));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.fs.check_user_change(ino.0);
        empty(
            reply,
            r.and_then(|()| self.fs.removexattr(ino.0, name.as_bytes())),
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.fs.check_user_change(parent.0).and_then(|()| {
            self.fs
                .create(parent.0, name.as_bytes(), mode as u16, caller(req))
        });
        match r {
            Ok(a) => reply.created(
                &TTL,
                &attr(&a),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.check_user_change(ino.0);
        empty(
            reply,
            r.and_then(|()| self.fs.fallocate(ino.0, offset, length, mode)),
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // The kernel answers SEEK_SET, SEEK_CUR and SEEK_END itself.
        let hole = match whence {
            libc::SEEK_DATA => false,
            libc::SEEK_HOLE => true,
            _ => return reply.error(Errno::from_i32(libc::EINVAL)),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::from_i32(libc::ENXIO));
        };
        match self.fs.seek_hole_data(ino.0, offset, hole) {
            // A file is never longer than i64::MAX (write and truncate refuse it).
            Ok(at) => reply.offset(i64::try_from(at).unwrap_or(i64::MAX)),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .fs
            .copy_range(ino_in.0, offset_in, ino_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(&e)),
        }
    }
}
