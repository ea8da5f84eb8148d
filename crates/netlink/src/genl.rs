//! Generic netlink's controller: family names resolved to the ids of this boot.

use crate::error::Error;
use crate::frame::{self, NLM_F_REQUEST};
use crate::socket::{End, Flow, Socket};

/// The controller family that resolves family names to ids (`genl ctrl`).
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// `genl ctrl get name NAME`: the family's id, or the kernel's errno (ENOENT: no such
/// family, its module is not loaded).
pub fn resolve_family(socket: &mut Socket, name: &str) -> Result<Result<u16, i32>, Error> {
    let mut id = None;
    let answer = socket.request(
        |w, seq| {
            let start = w.begin_genl(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY, 1);
            w.put_str(CTRL_ATTR_FAMILY_NAME, name);
            w.end(start);
        },
        |msg| {
            let (_, body) = msg.genl()?;
            let value = frame::find(body, CTRL_ATTR_FAMILY_ID)?
                .ok_or_else(|| Error::decode("family reply without an id"))?;
            id = Some(frame::get_u16(value)?);
            Ok::<_, Error>(Flow::Stop)
        },
    )?;
    match (answer.end, id) {
        (End::Failed(errno) | End::Done(errno), _) if errno != 0 => Ok(Err(errno)),
        (_, Some(id)) => Ok(Ok(id)),
        (_, None) => Err(Error::decode("family reply without an id")),
    }
}
