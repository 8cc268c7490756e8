//! The power-cut guest: a Debian kernel and an initramfs (tests/power/kit.sh)
//! booted by qemu, its data on a raw ext4 image that is a file on the host.
//! `Vm::cut` is the power cut: SIGKILL to qemu, so whatever the guest kernel
//! had not yet written to its virtual disk (its page cache) is gone, which a
//! process kill never loses. `Image::mount` then reads the disk on the host as
//! the next boot would find it (the ext4 journal is replayed by the mount).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kernel and base initramfs, built once per test from the ferry under test.
pub struct Kit {
    pub vmlinuz: PathBuf,
    pub base_cpio: PathBuf,
}

impl Kit {
    pub fn build(dir: &Path) -> Kit {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/power/kit.sh");
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("power-kit-cache");
        let out = Command::new("bash")
            .arg(script)
            .arg(dir)
            .arg(super::support::ferry())
            .env("FERRY_POWER_CACHE", &cache)
            .output()
            .expect("running tests/power/kit.sh");
        assert!(
            out.status.success(),
            "tests/power/kit.sh failed (needs busybox-static, qemu-system-x86 and apt-get; \
             scripts/test.sh installs them):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        Kit {
            vmlinuz: dir.join("vmlinuz"),
            base_cpio: dir.join("base.cpio"),
        }
    }

    /// The base initramfs plus an archive holding `tls` as /tls.
    pub fn initrd(&self, tls: &Path, out: &Path) -> PathBuf {
        let stage = out.with_extension("stage");
        std::fs::create_dir_all(stage.join("tls")).unwrap();
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            std::fs::copy(tls.join(f), stage.join("tls").join(f)).unwrap();
        }
        let list = Command::new("sh")
            .arg("-c")
            .arg("find tls | busybox cpio -o -H newc 2>/dev/null")
            .current_dir(&stage)
            .output()
            .unwrap();
        assert!(list.status.success() && !list.stdout.is_empty());
        let mut initrd = std::fs::read(&self.base_cpio).unwrap();
        initrd.extend_from_slice(&list.stdout);
        std::fs::write(out, initrd).unwrap();
        out.to_path_buf()
    }
}

/// The guest's data disk: a sparse raw file holding one ext4 filesystem.
pub struct Image {
    pub path: PathBuf,
}

impl Image {
    pub fn create(path: &Path, size: u64) -> Image {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "mkfs.ext4 failed");
        Image {
            path: path.to_path_buf(),
        }
    }

    /// Mounts the image on a loop device (ext4 replays its journal, which needs
    /// a writable device, as the guest's next boot would); the checks only
    /// read. Unmounted when the guard drops.
    pub fn mount(&self, at: &Path) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "ext4", "-o", "loop"])
            .arg(&self.path)
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting {} failed: {}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted {
            at: at.to_path_buf(),
        }
    }
}

pub struct Mounted {
    pub at: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
    }
}

/// How the guest is run: "tcg" (default) or "kvm" (FERRY_POWER_ACCEL). See
/// docs/ARCHITECTURE.md: on the machines this suite runs on, nested KVM hangs
/// the guest kernel before its first message, so the default is TCG.
pub fn accel() -> String {
    std::env::var("FERRY_POWER_ACCEL").unwrap_or_else(|_| "tcg".into())
}

pub struct Boot<'a> {
    pub kit: &'a Kit,
    pub initrd: &'a Path,
    pub image: &'a Image,
    /// "primary" or "replica": the node that runs in the guest.
    pub mode: &'a str,
    /// The other node's QUIC port on the host (the guest sees the host's
    /// loopback as 10.0.2.2).
    pub peer_port: u16,
    /// Host ports forwarded to the guest's QUIC (UDP 7443) and metrics (TCP 9100).
    pub quic_fwd: u16,
    pub metrics_fwd: u16,
    /// Host TCP port the guest's writer asks for its go signal (primary mode).
    pub go_port: u16,
    /// Console (ttyS0) and writer (ttyS1) logs of this boot.
    pub console: PathBuf,
    pub writer_log: PathBuf,
}

pub struct Vm {
    child: Option<Child>,
    pub console: PathBuf,
    pub metrics_fwd: u16,
    pub started: Instant,
}

impl Vm {
    pub fn boot(b: &Boot) -> Vm {
        let append = format!(
            "console=ttyS0 quiet panic=-1 fp_mode={} fp_peer=10.0.2.2:{} fp_go={}",
            b.mode, b.peer_port, b.go_port
        );
        let accel = accel();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", &accel]);
        if accel == "kvm" {
            cmd.args(["-cpu", "host,-arch-capabilities"]);
        }
        cmd.args(["-m", "512", "-smp", "1", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", b.console.display()))
            .arg("-serial")
            .arg(format!("file:{}", b.writer_log.display()))
            .arg("-kernel")
            .arg(&b.kit.vmlinuz)
            .arg("-initrd")
            .arg(b.initrd)
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=writeback",
                b.image.path.display()
            ))
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=udp:127.0.0.1:{}-:7443,hostfwd=tcp:127.0.0.1:{}-:9100",
                b.quic_fwd, b.metrics_fwd
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("starting qemu-system-x86_64");
        Vm {
            child: Some(child),
            console: b.console.clone(),
            metrics_fwd: b.metrics_fwd,
            started: Instant::now(),
        }
    }

    /// The power cut: SIGKILL to qemu, then reap it.
    pub fn cut(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Panics (with the console's tail) if qemu is gone: the guest powered
    /// itself off, which it does only when ferry exits or init fails.
    pub fn assert_running(&mut self) {
        let Some(c) = self.child.as_mut() else {
            panic!("the guest was already cut");
        };
        if let Ok(Some(st)) = c.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = c.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!(
                "the guest stopped by itself ({st}); qemu: {err}\nconsole:\n{}",
                self.console_tail()
            );
        }
    }

    /// Waits for the guest's ferry to answer /readyz with 200; returns the
    /// time since qemu was started.
    pub fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if super::support::http_get(self.metrics_fwd, "/readyz").is_some_and(|(c, _)| c == 200)
            {
                return self.started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "the guest's ferry was not ready within {timeout:?}; console:\n{}",
                self.console_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn metric(&self, name: &str) -> f64 {
        super::support::metric(self.metrics_fwd, name)
    }

    pub fn console_tail(&self) -> String {
        let s = std::fs::read(&self.console).unwrap_or_default();
        let s = String::from_utf8_lossy(&s);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.cut();
    }
}
