//! The dummy link itself: find it, create it, delete it.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};

use crate::connection::Connection;
use crate::error::Error;
use crate::request;

/// The name kube-proxy gives the dummy link that holds the service addresses.
pub const KUBE_IPVS0: &str = "kube-ipvs0";

/// A handle on one dummy link (normally `kube-ipvs0`) in the calling thread's network
/// namespace, with its own rtnetlink socket.
///
/// Blocking and `Send`: meant to live on one thread that does the kernel work. The handle
/// remembers the link's index; if the link is deleted behind its back, calls fail with
/// [`Error::LinkGone`] and the caller ensures it again.
#[derive(Debug)]
pub struct DummyLink {
    pub(crate) name: String,
    pub(crate) index: u32,
    pub(crate) connection: Connection,
}

/// What a lookup by name found.
#[derive(Debug)]
struct Found {
    index: u32,
    kind: Option<InfoKind>,
}

impl DummyLink {
    /// Makes sure the dummy link `name` exists and returns a handle on it.
    ///
    /// Mirrors `ip link add kube-ipvs0 type dummy` when the link is missing. A new link is left
    /// down, as kube-proxy leaves it (addresses on a down dummy still receive the node's
    /// traffic, through the local routing table); an existing dummy is not changed at all.
    /// A link of that name that is not a dummy is an [`Error::NotDummy`] and is left untouched.
    pub fn ensure(name: &str) -> Result<Self, Error> {
        check_name(name)?;
        let mut connection = Connection::open()?;
        if let Some(found) = find(&mut connection, name)? {
            return Self::from_found(connection, name, found);
        }
        let created = connection.call(
            &request::new_dummy_link(name),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("ip link add {name} type dummy"),
        );
        match created {
            Ok(_) => tracing::info!(link = name, "created dummy link"),
            // Someone created it between our lookup and our request: judge what is there now.
            Err(Error::Kernel { ref source, .. })
                if source.raw_os_error() == Some(libc::EEXIST) => {}
            Err(Error::Kernel { ref source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                return Err(Error::DummyUnsupported {
                    name: name.to_owned(),
                });
            }
            Err(e) => return Err(e),
        }
        match find(&mut connection, name)? {
            Some(found) => Self::from_found(connection, name, found),
            None => Err(Error::LinkGone {
                name: name.to_owned(),
                index: 0,
            }),
        }
    }

    /// A handle on the dummy link `name` if it exists (mirrors `ip link show kube-ipvs0`);
    /// never creates it. A non-dummy link of that name is an [`Error::NotDummy`].
    pub fn open(name: &str) -> Result<Option<Self>, Error> {
        check_name(name)?;
        let mut connection = Connection::open()?;
        match find(&mut connection, name)? {
            Some(found) => Self::from_found(connection, name, found).map(Some),
            None => Ok(None),
        }
    }

    /// Deletes the dummy link `name` and with it every address it holds, as `--cleanup` does.
    ///
    /// Mirrors `ip link del kube-ipvs0`. Returns whether a link was deleted: a missing link is
    /// not an error. A non-dummy link of that name is an [`Error::NotDummy`] and is kept.
    pub fn delete(name: &str) -> Result<bool, Error> {
        let Some(link) = Self::open(name)? else {
            return Ok(false);
        };
        link.delete_self()
    }

    fn delete_self(mut self) -> Result<bool, Error> {
        let (name, index) = (self.name, self.index);
        let deleted = self.connection.call(&request::del_link(index), 0, &|| {
            format!("ip link del {name}")
        });
        match deleted {
            Ok(_) => {
                tracing::info!(link = name, "deleted dummy link");
                Ok(true)
            }
            Err(Error::Kernel { ref source, .. })
                if source.raw_os_error() == Some(libc::ENODEV) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Makes the link exist again if it was deleted behind the handle's back (`ip link del
    /// kube-ipvs0` by hand): looks it up by name and, when it is missing or has another index,
    /// ensures it as [`DummyLink::ensure`] does and takes the new index. Returns whether the
    /// link the handle knew was gone. A full sync calls this before it lists the addresses, so
    /// a deleted link comes back with every address the next sync binds.
    ///
    /// Mirrors `ip link show kube-ipvs0`, and `ip link add kube-ipvs0 type dummy` when missing.
    pub fn reensure(&mut self) -> Result<bool, Error> {
        if find_index(&mut self.connection, &self.name)? == Some(self.index) {
            return Ok(false);
        }
        let again = Self::ensure(&self.name)?;
        tracing::warn!(
            link = self.name,
            was = self.index,
            now = again.index,
            "the dummy link was deleted while the proxy ran; made it again"
        );
        *self = again;
        Ok(true)
    }

    /// The link's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The link's interface index (as in `ip -o link show`).
    #[must_use]
    pub fn index(&self) -> u32 {
        self.index
    }

    /// A handle on any link, dummy or not: lets the host's kernel tests (which have veth but
    /// no dummy) drive the address code.
    #[cfg(test)]
    pub(crate) fn any_link_for_tests(name: &str) -> Result<Self, Error> {
        let mut connection = Connection::open()?;
        let found =
            find(&mut connection, name)?.ok_or_else(|| Error::InvalidName(name.to_owned()))?;
        Ok(Self {
            name: name.to_owned(),
            index: found.index,
            connection,
        })
    }

    fn from_found(connection: Connection, name: &str, found: Found) -> Result<Self, Error> {
        match found.kind {
            Some(InfoKind::Dummy) => Ok(Self {
                name: name.to_owned(),
                index: found.index,
                connection,
            }),
            Some(kind) => Err(Error::NotDummy {
                name: name.to_owned(),
                kind: kind.to_string(),
            }),
            None => Err(Error::NotDummy {
                name: name.to_owned(),
                kind: "kindless (physical or loopback)".to_owned(),
            }),
        }
    }
}

/// `ip link show NAME`: the link's index and kind, or `None` if there is no such link.
fn find(connection: &mut Connection, name: &str) -> Result<Option<Found>, Error> {
    let command = || format!("ip link show {name}");
    let answers = match connection.call(&request::get_link(name), 0, &command) {
        Ok(answers) => answers,
        Err(Error::Kernel { ref source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    for answer in answers {
        let RouteNetlinkMessage::NewLink(link) = answer else {
            continue;
        };
        let kind = link
            .attributes
            .into_iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::LinkInfo(infos) => infos.into_iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind),
                    _ => None,
                }),
                _ => None,
            });
        return Ok(Some(Found {
            index: link.header.index,
            kind,
        }));
    }
    Err(Error::Decode {
        command: command(),
        reason: "no RTM_NEWLINK in the answer".to_owned(),
    })
}

/// `ip link show NAME`: the link's index, or `None` if there is no such link.
pub(crate) fn find_index(connection: &mut Connection, name: &str) -> Result<Option<u32>, Error> {
    Ok(find(connection, name)?.map(|found| found.index))
}

/// Interface names are 1 to 15 bytes (`IFNAMSIZ` less the NUL), without `/`, `:` or
/// whitespace, and not `.` or `..` (the kernel's `dev_valid_name`).
fn check_name(name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_follow_the_kernels_rules() {
        for good in ["kube-ipvs0", "a", "fifteen-chars-x"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "sixteen-chars-xx", "a/b", "a:b", "a b", ".", ".."] {
            assert!(
                matches!(check_name(bad), Err(Error::InvalidName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn handle_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<DummyLink>();
    }
}
