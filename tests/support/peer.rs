#![allow(dead_code)]
//! A hand-driven peer for hostile tests: it holds real mTLS credentials
//! (made with `ferry cert`) and speaks ferry's wire protocol through
//! `ferry-net` and `ferry-proto`, but sends whatever the test tells it to,
//! including bytes no ferry would ever frame.

use bytes::{BufMut, BytesMut};
use ferry_net::{Conn, MsgRecv, MsgSend, NetError, TlsMaterial, Transport};
use ferry_proto::{
    BatchHeader, FileHeader, Hello, Message, Mtime, Refuse, RelPath, Welcome, VERSION,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One endpoint with one identity.
pub struct Peer {
    pub rt: tokio::runtime::Runtime,
    pub transport: std::sync::Arc<Transport>,
    pub name: String,
    pub tls: TlsMaterial,
}

/// What the replica answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Welcome(Welcome),
    Refuse(Refuse),
    Ack(u64),
    Other(String),
    /// The stream ended or the connection closed, with the reason.
    End(String),
    /// Nothing within the time allowed.
    Silent,
}

impl Peer {
    /// A peer named `name` using the files in `tls_dir` as they are (they
    /// may be expired, for another name or from another CA).
    pub fn new(tls_dir: &Path, name: &str) -> Peer {
        Self::with_allowed(tls_dir, name, &["replica"])
    }

    /// A peer that also accepts connections from the `allowed` names.
    pub fn with_allowed(tls_dir: &Path, name: &str, allowed: &[&str]) -> Peer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tls = ferry_net::testing::load_unchecked(tls_dir).unwrap();
        let transport = {
            let _g = rt.enter();
            std::sync::Arc::new(
                Transport::bind(
                    "127.0.0.1:0".parse().unwrap(),
                    &tls,
                    allowed.iter().map(|a| a.to_string()).collect(),
                )
                .unwrap(),
            )
        };
        Peer {
            rt,
            transport,
            name: name.into(),
            tls,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Dials the node at `port`, expecting its certificate to name `server`.
    pub fn dial(&self, port: u16, server: &str) -> Result<Conn, NetError> {
        self.rt
            .block_on(self.transport.connect(Self::addr(port), server))
    }

    /// Waits (up to `limit`) for a peer to connect and open its stream.
    pub fn accept(&self, limit: Duration) -> Option<Session<'_>> {
        let t = &self.transport;
        let (conn, send, recv) = self.rt.block_on(async {
            tokio::time::timeout(limit, async {
                loop {
                    let conn = match t.accept().await {
                        Some(Ok(c)) => c,
                        Some(Err(_)) => continue,
                        None => std::future::pending().await,
                    };
                    if let Ok((s, r)) = conn.accept().await {
                        return (conn, s, r);
                    }
                }
            })
            .await
            .ok()
        })?;
        Some(Session {
            peer: self,
            conn,
            send,
            recv,
        })
    }

    pub fn port(&self) -> u16 {
        self.transport.local_addr().unwrap().port()
    }

    /// Dials without presenting any client certificate.
    pub fn dial_anonymous(&self, port: u16, server: &str) -> Result<Conn, NetError> {
        self.rt.block_on(ferry_net::testing::connect_without_cert(
            &self.transport,
            &self.tls,
            Self::addr(port),
            server,
        ))
    }

    /// Dials and opens the message stream.
    pub fn session(&self, port: u16) -> Session<'_> {
        let conn = self.dial(port, "replica").expect("dial the replica");
        let (send, recv) = self.rt.block_on(conn.open()).expect("open a stream");
        Session {
            peer: self,
            conn,
            send,
            recv,
        }
    }

    /// True when a connection from this peer gets a stream answered: the
    /// handshake passed and the replica read and answered a hello.
    pub fn handshake_then_hello(&self, port: u16, epoch: u64) -> Result<Reply, String> {
        let conn = self.dial(port, "replica").map_err(|e| e.to_string())?;
        let (send, recv) = self.rt.block_on(conn.open()).map_err(|e| e.to_string())?;
        let mut s = Session {
            peer: self,
            conn,
            send,
            recv,
        };
        Ok(s.hello(epoch))
    }
}

/// One connection with one message stream.
pub struct Session<'a> {
    pub peer: &'a Peer,
    pub conn: Conn,
    pub send: MsgSend,
    pub recv: MsgRecv,
}

impl Session<'_> {
    pub fn send(&mut self, msgs: &[Message]) {
        let (send, rt) = (&mut self.send, &self.peer.rt);
        rt.block_on(async {
            for m in msgs {
                if send.send(m).await.is_err() {
                    return;
                }
            }
            let _ = send.flush().await;
        });
    }

    /// Bytes as they are, unframed.
    pub fn raw(&mut self, bytes: &[u8]) {
        let _ = self.peer.rt.block_on(self.send.send_raw(bytes));
    }

    pub fn finish(&mut self) {
        let _ = self.peer.rt.block_on(self.send.finish());
    }

    /// The next message from the replica (a version range before a
    /// refusal is passed over: the refusal is the answer).
    pub fn reply(&mut self, timeout: Duration) -> Reply {
        let recv = &mut self.recv;
        match self.peer.rt.block_on(async {
            tokio::time::timeout(timeout, async {
                loop {
                    match recv.recv().await {
                        Ok(Some(Message::Versions(_))) => continue,
                        other => return other,
                    }
                }
            })
            .await
        }) {
            Err(_) => Reply::Silent,
            Ok(Ok(Some(Message::Welcome(w)))) => Reply::Welcome(w),
            Ok(Ok(Some(Message::Refuse(r)))) => Reply::Refuse(r),
            Ok(Ok(Some(Message::Ack { seq, .. }))) => Reply::Ack(seq),
            Ok(Ok(Some(m))) => Reply::Other(format!("{m:?}")),
            Ok(Ok(None)) => Reply::End("stream finished".into()),
            Ok(Err(e)) => Reply::End(e.to_string()),
        }
    }

    /// The next message as it is (`None`: ended, failed or silent).
    pub fn next(&mut self, timeout: Duration) -> Option<Message> {
        let recv = &mut self.recv;
        self.peer
            .rt
            .block_on(async { tokio::time::timeout(timeout, recv.recv()).await })
            .ok()?
            .ok()?
    }

    /// Says hello as the primary of `epoch`; the replica's answer.
    pub fn hello(&mut self, epoch: u64) -> Reply {
        let name = self.peer.name.clone();
        self.send(&[
            Message::Hello(Hello {
                version: VERSION,
                node: name,
                epoch,
                last_seq: 0,
            }),
            Message::Versions(ferry_proto::VERSIONS),
        ]);
        self.reply(Duration::from_secs(10))
    }

    /// Hello, expecting a welcome: the replica's applied seq.
    pub fn start(&mut self, epoch: u64) -> u64 {
        match self.hello(epoch) {
            Reply::Welcome(w) => w.applied_seq,
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    pub fn is_open(&self) -> bool {
        ferry_net::testing::is_open(&self.conn)
    }
}

pub fn rel(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

pub fn begin(epoch: u64, seq: u64) -> Message {
    Message::BatchBegin(BatchHeader {
        epoch,
        seq,
        sealed_at_ns: 1,
        exact: true,
        resync: false,
    })
}

/// A whole file: header, data, end (with the right hash).
pub fn file(path: &str, data: &[u8]) -> Vec<Message> {
    vec![
        Message::FileBegin(FileHeader {
            path: rel(path),
            mode: 0o644,
            mtime: Mtime {
                secs: 1_700_000_000,
                nanos: 0,
            },
            size: data.len() as u64,
        }),
        Message::FileData(bytes::Bytes::copy_from_slice(data)),
        Message::FileEnd {
            hash: *blake3::hash(data).as_bytes(),
        },
    ]
}

/// A frame: `u32 length | u8 kind | payload`, with the length computed.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(payload.len() as u32 + 1);
    b.put_u8(kind);
    b.put_slice(payload);
    b.to_vec()
}

/// A `u16 length | bytes` field.
pub fn field16(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// Wire kinds (ferry-proto's `codec::kind`, private there).
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const MANIFEST_ENTRY: u8 = 5;
    pub const BATCH_BEGIN: u8 = 7;
    pub const OP_MKDIR: u8 = 8;
    pub const OP_SYMLINK: u8 = 9;
    pub const OP_DELETE: u8 = 10;
    pub const OP_RENAME: u8 = 11;
    pub const FILE_BEGIN: u8 = 13;
    pub const FILE_DATA: u8 = 14;
}

/// Raw `Mkdir` of a path no [`RelPath`] can hold.
pub fn raw_mkdir(path: &[u8]) -> Vec<u8> {
    let mut p = field16(path);
    p.extend_from_slice(&0o755u32.to_be_bytes());
    frame(kind::OP_MKDIR, &p)
}

/// Raw `FileBegin` of any path, mode and size.
pub fn raw_file_begin(path: &[u8], mode: u32, size: u64) -> Vec<u8> {
    let mut p = field16(path);
    p.extend_from_slice(&mode.to_be_bytes());
    p.extend_from_slice(&1_700_000_000i64.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes());
    p.extend_from_slice(&size.to_be_bytes());
    frame(kind::FILE_BEGIN, &p)
}

/// Peak and current resident memory of a process, in KiB (VmHWM, VmRSS).
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |key: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmHWM:"), get("VmRSS:"))
}

/// The pid of the `ferry run` process serving `root` (found in /proc).
pub fn pid_of(root: &Path) -> Option<u32> {
    let want = root.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_ferry = args
            .first()
            .is_some_and(|a| a.ends_with(b"/ferry") || *a == b"ferry");
        if is_ferry
            && args.iter().any(|a| *a == b"run")
            && args
                .windows(2)
                .any(|w| w[0] == b"--root" && w[1] == want.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// A directory outside every root, with content whose state is compared
/// before and after: nothing a peer sends may change it.
pub struct Outside {
    pub dir: PathBuf,
}

impl Outside {
    pub fn new(base: &Path) -> Outside {
        let dir = base.join("outside");
        std::fs::create_dir_all(dir.join("subdir")).unwrap();
        std::fs::write(dir.join("victim.txt"), b"must never change").unwrap();
        std::fs::write(dir.join("subdir/inner.txt"), b"nor this").unwrap();
        Outside { dir }
    }

    /// Every entry below the directory (and the directory itself), with
    /// mode, mtime and content.
    pub fn state(&self) -> Vec<String> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(&self.dir).sort_by_file_name() {
            let Ok(e) = e else { continue };
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            let content = if md.is_file() {
                blake3::hash(&std::fs::read(e.path()).unwrap_or_default())
                    .to_hex()
                    .to_string()
            } else {
                String::new()
            };
            out.push(format!(
                "{} {:o} {} {}.{} {}",
                e.path().display(),
                md.mode(),
                md.nlink(),
                md.mtime(),
                md.mtime_nsec(),
                content
            ));
        }
        out
    }
}
