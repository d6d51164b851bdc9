//! Boards a labgrid farm hands out: the place is looked up when the run
//! opens (it exists, its tags give the board profile), taken when the
//! board's first job starts (so a place someone holds only delays its own
//! board), reached at its NetworkService by the same SSH runner as any
//! board, power-cycled once when it stops answering (if the config allows
//! and the place has a power resource), and given back when the board's
//! jobs are over, also when they failed.

use crate::fleet::labgrid::{HeldPlace, LabgridClient};
use crate::runs::deploy::SshRunner;
use crate::runs::jobs::PlannedJob;
use crate::runs::manifest::{FarmRecord, PowerCycleRecord};
use crate::runs::run::{BoardRunner, RunError};
use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};
use wire::progress::ProgressEvent;

/// The SSH runner, on a place it takes first.
pub struct FarmRunner {
    pub inner: SshRunner,
    client: Option<LabgridClient>,
    place: Option<HeldPlace>,
    /// How long to wait for a place someone else holds.
    lock_wait: Duration,
    record: FarmRecord,
    /// Set once taking the place failed: the board's later jobs fail the
    /// same way without asking again.
    take_failed: Option<String>,
}

impl FarmRunner {
    pub fn new(inner: SshRunner, lock_wait: Duration) -> FarmRunner {
        let farm = inner.board.farm.clone();
        let record = FarmRecord {
            place: farm.as_ref().map(|f| f.place.clone()).unwrap_or_default(),
            coordinator: farm
                .as_ref()
                .map(|f| f.coordinator.clone())
                .unwrap_or_default(),
            tags: farm.map(|f| f.tags).unwrap_or_default(),
            ..Default::default()
        };
        FarmRunner {
            inner,
            client: None,
            place: None,
            lock_wait,
            record,
            take_failed: None,
        }
    }

    fn log(&self, line: String) {
        (self.inner.log)(format!("{}: {line}", self.inner.board.name))
    }

    /// Takes the place if this runner does not hold it yet, and points the
    /// SSH runner at its NetworkService.
    fn take_place(&mut self) -> Result<(), RunError> {
        if self.place.is_some() {
            return Ok(());
        }
        if let Some(reason) = &self.take_failed {
            return Err(RunError::Board(reason.clone()));
        }
        let result = LabgridClient::find(&self.record.coordinator).and_then(|client| {
            let log = self.inner.log.clone();
            let name = self.inner.board.name.clone();
            let held = HeldPlace::take(&client, &self.record.place, self.lock_wait, &|line| {
                log(format!("{name}: {line}"))
            })?;
            Ok((client, held))
        });
        let (client, held) = match result {
            Ok(taken) => taken,
            Err(e) => {
                let reason = e.to_string();
                self.record.error = Some(reason.clone());
                self.take_failed = Some(reason.clone());
                return Err(RunError::Board(reason));
            }
        };
        let board = &mut self.inner.board;
        board.host = held.network.address.clone();
        if let Some(user) = &held.network.username {
            board.user = user.clone();
        }
        board.port = held.network.port.unwrap_or(22);
        self.record.token = Some(held.token.clone());
        self.record.reached_at = Some(format!("{}@{}:{}", board.user, board.host, board.port));
        self.record.acquired_at = Some(wire::utc_now_rfc3339_millis());
        let reached = self.record.reached_at.clone().unwrap_or_default();
        self.log(format!(
            "took labgrid place {} (reservation {}), board at {reached}",
            self.record.place, held.token
        ));
        self.client = Some(client);
        self.place = Some(held);
        Ok(())
    }
}

impl BoardRunner for FarmRunner {
    fn board(&self) -> &str {
        self.inner.board()
    }

    fn uploaded_bytes(&self) -> u64 {
        self.inner.uploaded_bytes()
    }

    fn run(
        &mut self,
        job: &PlannedJob,
        job_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        self.take_place()?;
        self.inner.run(job, job_dir, on_event)
    }

    fn reattach(
        &mut self,
        job: &PlannedJob,
        job_dir: &Path,
        on_event: &mut dyn FnMut(&ProgressEvent),
    ) -> Result<(), RunError> {
        self.take_place()?;
        self.inner.reattach(job, job_dir, on_event)
    }

    /// One power cycle, when allowed, the place has power, the board's SSH
    /// port does not answer and none was tried yet on this board; true
    /// once SSH answers again.
    fn recover(&mut self, failure: &str) -> bool {
        let (Some(farm), Some(place), Some(client)) =
            (&self.inner.board.farm, &self.place, &self.client)
        else {
            return false;
        };
        if !farm.power_cycle || !place.has_power || !self.record.power_cycles.is_empty() {
            return false;
        }
        let (host, port) = (self.inner.board.host.clone(), self.inner.board.port);
        if answers_ssh(&host, port, Duration::from_secs(5)) {
            // It answers: the failure is not one a power cycle mends.
            return false;
        }
        let boot = Duration::from_secs(farm.boot_seconds);
        self.log(format!(
            "does not answer SSH at {host}:{port}: power-cycling labgrid place {} and waiting up to {} s for SSH",
            self.record.place,
            boot.as_secs()
        ));
        let mut record = PowerCycleRecord {
            at: wire::utc_now_rfc3339_millis(),
            reason: failure.to_string(),
            ..Default::default()
        };
        let started = Instant::now();
        match client.power_cycle(&self.record.place) {
            Ok(()) => {
                if wait_for_ssh(&host, port, boot) {
                    record.ssh_after_seconds = Some(started.elapsed().as_secs_f64());
                } else {
                    record.error = Some(format!("SSH did not answer within {} s", boot.as_secs()));
                }
            }
            Err(e) => record.error = Some(e.to_string()),
        }
        let answered = record.ssh_after_seconds.is_some();
        self.log(match (&record.ssh_after_seconds, &record.error) {
            (Some(s), _) => format!("answers SSH {s:.1} s after the power cycle: trying again"),
            (None, Some(e)) => format!("power cycle did not bring it back: {e}"),
            (None, None) => "power cycle did not bring it back".into(),
        });
        self.record.power_cycles.push(record);
        answered
    }

    fn release(&mut self) {
        let Some(mut place) = self.place.take() else {
            return;
        };
        match place.release() {
            Ok(()) => {
                self.record.released_at = Some(wire::utc_now_rfc3339_millis());
                self.log(format!("released labgrid place {}", self.record.place));
            }
            Err(e) => {
                let message = format!(
                    "could not release labgrid place {}: {e}; release it by hand (`labgrid-client -p {} release`)",
                    self.record.place, self.record.place
                );
                self.log(message.clone());
                self.record.error.get_or_insert(message);
            }
        }
    }

    fn farm_record(&self) -> Option<FarmRecord> {
        Some(self.record.clone())
    }
}

/// True when something at `host:port` accepts a connection and greets
/// like an SSH server within `timeout`.
pub fn answers_ssh(host: &str, port: u16, timeout: Duration) -> bool {
    let Some(addr) = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut greeting = [0u8; 4];
    stream.read_exact(&mut greeting).is_ok() && &greeting == b"SSH-"
}

/// Polls `answers_ssh` until it does or `limit` passes.
fn wait_for_ssh(host: &str, port: u16, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if answers_ssh(host, port, Duration::from_secs(2)) {
            return true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    false
}
