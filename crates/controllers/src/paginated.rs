//! Paginated list-then-watch, for API servers that refuse streaming lists, made the way
//! client-go's reflector and pager make it (tools/cache/reflector.go, tools/pager):
//!
//! - the first page asks `resourceVersion=0&limit=N`: served from the watch cache, never a
//!   quorum read from etcd. A server that ignores the limit there (the watch cache before
//!   Kubernetes 1.34) answers everything at once, without a continue token; one that honours
//!   it answers a page and a token;
//! - the next pages send the continue token and no resourceVersion (the server refuses both
//!   together; the token carries the list's snapshot);
//! - then a watch from the list's resourceVersion, with bookmarks, re-opened from the last
//!   resourceVersion seen whenever it ends, until the server answers `410 Gone`, when the
//!   list starts over at `resourceVersion=0`.
//!
//! kube-runtime's watcher cannot make the first request: its paginated list has no
//! resourceVersion (a quorum read per node), and kube-core drops `resourceVersion=0` whenever a
//! limit is set. The stream yields kube-runtime's own events and errors, so the follower
//! treats it as it treats a watcher, and kube-runtime's `StreamBackoff` paces its retries.

use std::collections::VecDeque;
use std::fmt::Debug;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _};
use kube::api::{Api, ListParams, ObjectList, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt as _};
use serde::de::DeserializeOwned;

/// Where the list-then-watch is.
enum State<K> {
    /// The first page is next.
    Start,
    /// Handing out a page; `continue_token` names the next one, `None` after the last.
    Paging {
        continue_token: Option<String>,
        rv: String,
        items: VecDeque<K>,
    },
    /// Listed (or a watch ended): a watch from `rv` is next.
    Listed { rv: String },
    Watching {
        rv: String,
        stream: BoxStream<'static, kube::Result<WatchEvent<K>>>,
    },
}

/// Lists and watches `api` with the selectors, page size and timeout of `config`.
pub(crate) fn list_watch<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    futures::stream::unfold(
        (api, config, State::Start),
        |(api, config, state)| async move {
            let (item, state) = step(&api, &config, state).await;
            Some((item, (api, config, state)))
        },
    )
}

/// Advances until there is something to yield.
async fn step<K>(
    api: &Api<K>,
    config: &watcher::Config,
    mut state: State<K>,
) -> (watcher::Result<Event<K>>, State<K>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    loop {
        state = match state {
            State::Start => match first_page(api, config).await {
                Ok(list) => match page(list) {
                    Some(paging) => return (Ok(Event::Init), paging),
                    None => return (Err(watcher::Error::NoResourceVersion), State::Start),
                },
                Err(e) => return (Err(watcher::Error::InitialListFailed(e)), State::Start),
            },
            State::Paging {
                continue_token,
                rv,
                mut items,
            } => {
                if let Some(object) = items.pop_front() {
                    let paging = State::Paging {
                        continue_token,
                        rv,
                        items,
                    };
                    return (Ok(Event::InitApply(object)), paging);
                }
                let Some(token) = continue_token else {
                    return (Ok(Event::InitDone), State::Listed { rv });
                };
                let params = ListParams {
                    label_selector: config.label_selector.clone(),
                    field_selector: config.field_selector.clone(),
                    limit: config.page_size,
                    continue_token: Some(token),
                    ..ListParams::default()
                };
                // Any failure (an expired token is 410) lists again from the first page.
                match api.list(&params).await {
                    Ok(list) => page(list).unwrap_or(State::Start),
                    Err(e) => return (Err(watcher::Error::InitialListFailed(e)), State::Start),
                }
            }
            State::Listed { rv } => {
                let params = WatchParams {
                    label_selector: config.label_selector.clone(),
                    field_selector: config.field_selector.clone(),
                    timeout: config.timeout,
                    bookmarks: true,
                    send_initial_events: false,
                };
                match api.watch(&params, &rv).await {
                    Ok(stream) => State::Watching {
                        rv,
                        stream: stream.boxed(),
                    },
                    Err(e) => {
                        let next = if matches!(&e, kube::Error::Api(s) if s.code == 410) {
                            State::Start
                        } else {
                            State::Listed { rv }
                        };
                        return (Err(watcher::Error::WatchStartFailed(e)), next);
                    }
                }
            }
            State::Watching { rv, mut stream } => match stream.next().await {
                Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                    let rv = o.resource_version().unwrap_or(rv);
                    return (Ok(Event::Apply(o)), State::Watching { rv, stream });
                }
                Some(Ok(WatchEvent::Deleted(o))) => {
                    let rv = o.resource_version().unwrap_or(rv);
                    return (Ok(Event::Delete(o)), State::Watching { rv, stream });
                }
                Some(Ok(WatchEvent::Bookmark(b))) => State::Watching {
                    rv: b.metadata.resource_version,
                    stream,
                },
                Some(Ok(WatchEvent::Error(status))) => {
                    let next = if status.code == 410 {
                        State::Start
                    } else {
                        State::Watching { rv, stream }
                    };
                    return (Err(watcher::Error::WatchError(status)), next);
                }
                Some(Err(e)) => return (Err(watcher::Error::WatchFailed(e)), State::Listed { rv }),
                // The server-side timeout: resume where it ended, no list.
                None => State::Listed { rv },
            },
        }
    }
}

/// The first page, at `resourceVersion=0` with the page size as its limit.
async fn first_page<K>(api: &Api<K>, config: &watcher::Config) -> kube::Result<ObjectList<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let params = ListParams {
        label_selector: config.label_selector.clone(),
        field_selector: config.field_selector.clone(),
        resource_version: Some("0".to_owned()),
        ..ListParams::default()
    };
    let mut request = kube::core::Request::new(api.resource_url())
        .list(&params)
        .map_err(kube::Error::BuildRequest)?;
    if let Some(limit) = config.page_size {
        // kube-core leaves resourceVersion=0 out when a limit is set; client-go sends both.
        let uri = format!("{}&limit={limit}", request.uri());
        *request.uri_mut() = uri.parse().map_err(|e: http::uri::InvalidUri| {
            kube::Error::BuildRequest(kube::core::request::Error::BuildRequest(e.into()))
        })?;
    }
    request.extensions_mut().insert("list");
    api.clone().into_client().request(request).await
}

/// A page to hand out, or `None` when the server gave neither a resourceVersion nor a token.
fn page<K: Clone>(list: ObjectList<K>) -> Option<State<K>> {
    let rv = list.metadata.resource_version.filter(|s| !s.is_empty());
    let continue_token = list.metadata.continue_.filter(|s| !s.is_empty());
    if rv.is_none() && continue_token.is_none() {
        return None;
    }
    Some(State::Paging {
        continue_token,
        rv: rv.unwrap_or_default(),
        items: list.items.into(),
    })
}
