//! The least a program that follows manifest files does for one endpoint change, to set the
//! daemon's change beside: a thread that waits on inotify for a file renamed into its own
//! directory, reads it, decodes its EndpointSlice with serde_yaml (as the daemon's watcher
//! does), and sends the change's two IPVS operations with the `ipvs` crate, to a virtual
//! server of its own. No state, no plan, no diff: what is left of the daemon's time over this
//! one is the daemon's own. Included by `bench_sync` only, with `#[path]`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use inotify::{Inotify, WatchMask};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::support::ENDPOINTS;
use crate::support::cluster::{endpoint, service_yaml};

/// The file the reactor follows; another name renamed into its directory stops it.
const FILE: &str = "svc.yaml";

/// The reactor's thread and the directory it follows.
pub struct Reactor {
    dir: PathBuf,
    thread: Option<JoinHandle<Result<()>>>,
    /// Its virtual server, and the Service index whose manifest it is given.
    pub key: ipvs::ServiceKey,
    service: u32,
}

impl Reactor {
    /// A reactor on virtual server `key`, which it creates with the endpoints of Service
    /// `service`'s manifest ([`service_yaml`]) and removes when it stops.
    pub fn start(dir: &Path, key: ipvs::ServiceKey, service: u32) -> Result<Reactor> {
        std::fs::create_dir_all(dir)?;
        let mut handle = ipvs::Handle::new().context("the reactor's netlink socket")?;
        let reals = (0..ENDPOINTS).map(|j| SocketAddr::from((endpoint(service, j), 8080)));
        add_virtual_server(&mut handle, key, reals)?;
        let mut inotify = Inotify::init()?;
        inotify.watches().add(dir, WatchMask::MOVED_TO)?;
        let path = dir.join(FILE);
        let last = endpoint(service, ENDPOINTS - 1);
        let thread = std::thread::Builder::new()
            .name("reactor".into())
            .spawn(move || react(&mut inotify, &mut handle, &path, key, last))?;
        Ok(Reactor {
            dir: dir.to_owned(),
            thread: Some(thread),
            key,
            service,
        })
    }

    /// Moves the last endpoint to `moved` as [`crate::support::source::Source::change`] does: the
    /// manifest written beside and renamed into the directory.
    pub fn change(&self, moved: Ipv4Addr) -> Result<()> {
        let tmp = self.dir.join(".svc.tmp");
        std::fs::write(&tmp, service_yaml(self.service, Some(moved)))?;
        std::fs::rename(&tmp, self.dir.join(FILE))?;
        Ok(())
    }

    /// Stops the thread, and says whether it failed.
    pub fn stop(mut self) -> Result<()> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let tmp = self.dir.join(".stop.tmp");
        std::fs::write(&tmp, "")?;
        std::fs::rename(&tmp, self.dir.join("stop"))?;
        match thread.join() {
            Ok(result) => result,
            Err(_) => bail!("the reactor panicked"),
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        let _ = self.stop_thread();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Adds virtual server `key` (round-robin) with a masqueraded real server on each of `reals`.
pub fn add_virtual_server(
    handle: &mut ipvs::Handle,
    key: ipvs::ServiceKey,
    reals: impl IntoIterator<Item = SocketAddr>,
) -> Result<()> {
    let mut ops = vec![ipvs::Op::AddService(ipvs::VirtualServer::new(
        key,
        ipvs::Scheduler::RoundRobin,
    ))];
    ops.extend(
        reals
            .into_iter()
            .map(|addr| ipvs::Op::AddDest(key, ipvs::RealServer::masquerade(addr))),
    );
    for result in handle.apply(&ops) {
        result?;
    }
    Ok(())
}

/// The reactor's loop: each rename of [`FILE`] into the directory is decoded and its last
/// endpoint made the virtual server's, the one it replaces drained (weight 0); deleting that
/// one is left to the benchmark, untimed, as the daemon deletes it after its drain check.
fn react(
    inotify: &mut Inotify,
    handle: &mut ipvs::Handle,
    path: &Path,
    key: ipvs::ServiceKey,
    mut last: Ipv4Addr,
) -> Result<()> {
    let mut buffer = [0; 4096];
    let result = loop {
        let events = inotify.read_events_blocking(&mut buffer)?;
        let mut changed = false;
        for event in events {
            match event.name.and_then(|n| n.to_str()) {
                Some(FILE) => changed = true,
                Some(_) => return finish(handle, key),
                None => {}
            }
        }
        if !changed {
            continue;
        }
        let text = std::fs::read_to_string(path)?;
        let moved = match last_endpoint(&text) {
            Ok(ip) => ip,
            Err(e) => break Err(e),
        };
        let old = ipvs::RealServer {
            weight: 0,
            ..ipvs::RealServer::masquerade(SocketAddr::from((last, 8080)))
        };
        let ops = [
            ipvs::Op::AddDest(
                key,
                ipvs::RealServer::masquerade(SocketAddr::from((moved, 8080))),
            ),
            ipvs::Op::UpdateDest(key, old),
        ];
        for result in handle.apply(&ops) {
            result?;
        }
        last = moved;
    };
    let _ = finish(handle, key);
    result
}

fn finish(handle: &mut ipvs::Handle, key: ipvs::ServiceKey) -> Result<()> {
    handle.delete_service(&key)?;
    Ok(())
}

/// The address of the last endpoint of the file's EndpointSlice, its second document, which
/// alone is decoded (the daemon's watcher decodes only the documents whose text changed).
fn last_endpoint(text: &str) -> Result<Ipv4Addr> {
    let (_, slice) = text
        .split_once("\n---\n")
        .context("the manifest's second document")?;
    let slice: EndpointSlice = serde_yaml::from_str(slice)?;
    let address = slice
        .endpoints
        .last()
        .and_then(|e| e.addresses.first())
        .context("the slice's last endpoint")?;
    Ok(address.parse()?)
}
