//! One manifest document decoded in one pass, straight into the typed object of its kind.
//!
//! Parsing a document into a `serde_yaml::Value` tree and converting the tree into a
//! k8s-openapi type builds every string and mapping twice. Hand-written and `kubectl`-written
//! manifests give `apiVersion` and `kind` first, so by the time the body comes the type is
//! known and the body can be decoded into it directly, the same fields the k8s-openapi type's
//! own decoder reads (a later duplicate of a field wins, `null` is the field's default). A
//! document that does not fit (its body before its kind, a field of the wrong type, a syntax
//! error) fails to decode, and [`crate::manifests::parse_into`] reads its file again through
//! `Value`, which names the error.
//!
//! One leniency comes with serde_yaml's typed decoding: a number or boolean where a string is
//! expected is taken as its text (`name: 80` is the name "80"), where the `Value` path refuses
//! it.

use std::fmt;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

/// Which type a document's apiVersion and kind name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Service,
    EndpointSlice,
    Node,
    /// Service, EndpointSlice or Node at an apiVersion the proxy does not read.
    Unsupported,
    /// `kind: List`, or another kind ending in `List` (read as a list if it has `items`).
    List,
    /// A kind the proxy does not read.
    Other,
}

impl Target {
    pub(crate) fn of(api_version: &str, kind: &str) -> Target {
        match (api_version, kind) {
            ("v1", "Service") => Target::Service,
            ("discovery.k8s.io/v1", "EndpointSlice") => Target::EndpointSlice,
            ("v1", "Node") => Target::Node,
            (_, "Service" | "EndpointSlice" | "Node") => Target::Unsupported,
            (_, k) if k.ends_with("List") => Target::List,
            _ => Target::Other,
        }
    }
}

/// A document (a mapping) as far as the proxy reads it.
#[derive(Debug)]
pub(crate) struct Document {
    /// Empty when not given.
    pub api_version: String,
    pub kind: Option<String>,
    pub body: Body,
}

/// The part of a document its kind gives a type to.
#[derive(Debug)]
pub(crate) enum Body {
    /// A kind the proxy does not read, or no kind.
    None,
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
    /// A list's `items` (`None`: the field was not given, or `null`) and whether it was given.
    List {
        items: Option<Vec<Option<Document>>>,
        given: bool,
    },
}

impl Body {
    fn of(target: Target) -> Body {
        match target {
            Target::Service => Body::Service(Box::default()),
            Target::EndpointSlice => Body::EndpointSlice(Box::default()),
            Target::Node => Body::Node(Box::default()),
            Target::List => Body::List {
                items: None,
                given: false,
            },
            Target::Unsupported | Target::Other => Body::None,
        }
    }

    /// Decodes the value of `field` into the body, or skips it if the kind has no such field.
    fn field<'de, A: MapAccess<'de>>(&mut self, field: Field, map: &mut A) -> Result<(), A::Error> {
        match (self, field) {
            (Body::Service(s), Field::Metadata) => s.metadata = meta(map)?,
            (Body::Service(s), Field::Spec) => s.spec = map.next_value()?,
            (Body::Service(s), Field::Status) => s.status = map.next_value()?,
            (Body::Node(n), Field::Metadata) => n.metadata = meta(map)?,
            (Body::Node(n), Field::Spec) => n.spec = map.next_value()?,
            (Body::Node(n), Field::Status) => n.status = map.next_value()?,
            (Body::EndpointSlice(e), Field::Metadata) => e.metadata = meta(map)?,
            (Body::EndpointSlice(e), Field::AddressType) => {
                e.address_type = map.next_value::<Option<String>>()?.unwrap_or_default();
            }
            (Body::EndpointSlice(e), Field::Endpoints) => {
                e.endpoints = map.next_value::<Option<_>>()?.unwrap_or_default();
            }
            (Body::EndpointSlice(e), Field::Ports) => e.ports = map.next_value()?,
            (Body::List { items, given }, Field::Items) => {
                *items = map.next_value()?;
                *given = true;
            }
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

fn meta<'de, A: MapAccess<'de>>(
    map: &mut A,
) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, A::Error> {
    Ok(map.next_value::<Option<_>>()?.unwrap_or_default())
}

/// The keys of a document: `apiVersion`, `kind`, and those of the body of some kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ApiVersion,
    Kind,
    Metadata,
    Spec,
    Status,
    AddressType,
    Endpoints,
    Ports,
    Items,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Field, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(match v {
                    "apiVersion" => Field::ApiVersion,
                    "kind" => Field::Kind,
                    "metadata" => Field::Metadata,
                    "spec" => Field::Spec,
                    "status" => Field::Status,
                    "addressType" => Field::AddressType,
                    "endpoints" => Field::Endpoints,
                    "ports" => Field::Ports,
                    "items" => Field::Items,
                    _ => Field::Other,
                })
            }
        }
        d.deserialize_identifier(Name)
    }
}

/// A string written as one (`kind: 5` is no kind, as the `Value` path reads it).
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        struct Only;
        impl Visitor<'_> for Only {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
        }
        d.deserialize_any(Only)
    }
}

/// Why a document is left to the `Value` path: a field of its body came before its kind.
const OUT_OF_ORDER: &str = "apiVersion and kind do not come first";

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Document, D::Error> {
        d.deserialize_map(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut api_version: Option<String> = None;
        let mut kind: Option<String> = None;
        let mut body: Option<Body> = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::ApiVersion | Field::Kind => {
                    if body.is_some() {
                        return Err(de::Error::custom(OUT_OF_ORDER));
                    }
                    let Text(value) = map.next_value()?;
                    if field == Field::Kind {
                        kind = Some(value);
                    } else {
                        api_version = Some(value);
                    }
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
                field => {
                    if body.is_none() {
                        let (Some(api_version), Some(kind)) = (&api_version, &kind) else {
                            return Err(de::Error::custom(OUT_OF_ORDER));
                        };
                        body = Some(Body::of(Target::of(api_version, kind)));
                    }
                    if let Some(body) = &mut body {
                        body.field(field, &mut map)?;
                    }
                }
            }
        }
        let api_version = api_version.unwrap_or_default();
        let body = match (body, &kind) {
            (Some(body), _) => body,
            (None, Some(kind)) => Body::of(Target::of(&api_version, kind)),
            (None, None) => Body::None,
        };
        Ok(Document {
            api_version,
            kind,
            body,
        })
    }
}
