//! Route templates: raw paths are matched to a known template, so the label set stays
//! bounded whatever URLs clients send.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// A route template such as `/api/dashboard/realtime/broadcast/{room}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

/// The label used for every path that matches no template.
pub const UNMATCHED: &str = "unmatched";

/// The known route templates, matched in the order given; anything else is
/// [`UNMATCHED`].
///
/// ```
/// use upcoach_perf::RouteTable;
///
/// let routes = RouteTable::new(["/health", "/api/dashboard/realtime/broadcast/{room}"])?;
/// assert_eq!(routes.template(routes.match_path("/api/dashboard/realtime/broadcast/metrics")),
///            "/api/dashboard/realtime/broadcast/{room}");
/// assert_eq!(routes.template(routes.match_path("/wp-admin.php")), "unmatched");
/// # Ok::<(), upcoach_perf::InvalidTemplate>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RouteTable {
    templates: Vec<Template>,
    /// Template ids by segment count, in table order: a path is only compared with
    /// templates of its own length.
    by_len: Vec<Vec<RouteId>>,
    /// Template ids by their exact text, for [`RouteTable::id_of`].
    by_text: HashMap<Box<str>, RouteId>,
}

/// The most segments a template (and a matched path) may have.
pub(crate) const MAX_SEGMENTS: usize = 16;

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.templates.iter().map(|t| &t.text))
            .finish()
    }
}

/// A route template was not `/`-separated literals and `{name}` parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid route template {template:?}: {reason}")]
pub struct InvalidTemplate {
    /// The template.
    pub template: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// Index of a route in its [`RouteTable`]; `len()` of the table means unmatched.
pub type RouteId = usize;

impl RouteTable {
    /// A table of `templates` (each starting with `/`; `{name}` matches one segment).
    pub fn new<I, S>(templates: I) -> Result<Self, InvalidTemplate>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut out = Vec::new();
        for text in templates {
            let text = text.into();
            let invalid = |reason| InvalidTemplate {
                template: text.clone(),
                reason,
            };
            if !text.starts_with('/') {
                return Err(invalid("it must start with '/'"));
            }
            if text.len() > 256 {
                return Err(invalid("it is longer than 256 bytes"));
            }
            let mut segments = Vec::new();
            for part in text[1..].split('/') {
                if part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
                    segments.push(Segment::Param);
                } else if part.contains(['{', '}']) {
                    return Err(invalid("a parameter must be a whole segment, like {name}"));
                } else {
                    segments.push(Segment::Literal(part.to_owned()));
                }
            }
            if segments.len() > MAX_SEGMENTS {
                return Err(invalid("it has more than 16 segments"));
            }
            if out.iter().any(|t: &Template| t.text == text) {
                return Err(invalid("it is listed twice"));
            }
            out.push(Template { text, segments });
        }
        let mut by_len = vec![Vec::new(); MAX_SEGMENTS + 1];
        for (id, template) in out.iter().enumerate() {
            by_len[template.segments.len()].push(id);
        }
        let by_text = out
            .iter()
            .enumerate()
            .map(|(id, template)| (Box::from(template.text.as_str()), id))
            .collect();
        Ok(Self {
            templates: out,
            by_len,
            by_text,
        })
    }

    /// How many templates (the unmatched route's id).
    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// Whether there are no templates.
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// The id of the first template `path` matches, or [`len`](Self::len) for none.
    #[inline]
    pub fn match_path(&self, path: &str) -> RouteId {
        let unmatched = self.templates.len();
        let Some(rest) = path.strip_prefix('/') else {
            return unmatched;
        };
        let rest = rest.as_bytes();
        let n = rest.iter().filter(|&&b| b == b'/').count() + 1;
        let Some(candidates) = self.by_len.get(n) else {
            return unmatched;
        };
        for &id in candidates {
            if matches(&self.templates[id].segments, rest) {
                return id;
            }
        }
        unmatched
    }

    /// The id of the template whose text is exactly `template` (as a router names the
    /// route it matched, e.g. `/auth/{provider}/token`), or [`len`](Self::len) for a
    /// template not in the table. One hash lookup: no path matching.
    ///
    /// ```
    /// use upcoach_perf::RouteTable;
    ///
    /// let routes = RouteTable::new(["/health", "/auth/{provider}/token"])?;
    /// assert_eq!(routes.id_of("/auth/{provider}/token"), 1);
    /// assert_eq!(routes.id_of("/auth/google/token"), routes.len(), "a path is not a template");
    /// # Ok::<(), upcoach_perf::InvalidTemplate>(())
    /// ```
    #[inline]
    pub fn id_of(&self, template: &str) -> RouteId {
        self.by_text
            .get(template)
            .copied()
            .unwrap_or(self.templates.len())
    }

    /// The template text of `id` ([`UNMATCHED`] for the unmatched id).
    pub fn template(&self, id: RouteId) -> &str {
        self.templates
            .get(id)
            .map_or(UNMATCHED, |t| t.text.as_str())
    }
}

/// Whether `rest` (a path without its leading `/`, with as many segments as the
/// template) matches the template's segments. Byte comparisons only: this runs on
/// every request.
#[inline]
fn matches(segments: &[Segment], rest: &[u8]) -> bool {
    let mut pos = 0;
    for (i, segment) in segments.iter().enumerate() {
        let end = match segment {
            Segment::Literal(literal) => {
                let end = pos + literal.len();
                if rest.get(pos..end) != Some(literal.as_bytes()) {
                    return false;
                }
                end
            }
            Segment::Param => {
                let end = rest[pos..]
                    .iter()
                    .position(|&b| b == b'/')
                    .map_or(rest.len(), |p| pos + p);
                if end == pos {
                    return false;
                }
                end
            }
        };
        if i + 1 == segments.len() {
            return end == rest.len();
        }
        if rest.get(end) != Some(&b'/') {
            return false;
        }
        pos = end + 1;
    }
    false
}

/// The route template a router matched, e.g. `/auth/{provider}/token`, put in the
/// *response* extensions so that [`RequestTimingLayer`](crate::RequestTimingLayer)
/// records the request under it instead of matching the path against its
/// [`RouteTable`] again.
///
/// A template from a `&'static str` (the usual case: a router's table of literals) costs
/// nothing to make or clone; one from a `String` or `Arc<str>` is shared through an
/// [`Arc`]. It is compared with the table's templates by exact text.
///
/// ```
/// use std::sync::Arc;
/// use upcoach_perf::MatchedRoute;
///
/// let mut response = http::Response::new(());
/// response.extensions_mut().insert(MatchedRoute::from_static("/auth/{provider}/token"));
/// let matched = response.extensions().get::<MatchedRoute>().unwrap();
/// assert_eq!(matched.as_str(), "/auth/{provider}/token");
/// assert_eq!(*matched, MatchedRoute::from(Arc::<str>::from("/auth/{provider}/token")));
/// ```
#[derive(Clone)]
pub struct MatchedRoute(MatchedRepr);

#[derive(Clone)]
enum MatchedRepr {
    Static(&'static str),
    Shared(Arc<str>),
}

impl MatchedRoute {
    /// A template known at compile time (no allocation, no reference count).
    pub const fn from_static(template: &'static str) -> Self {
        Self(MatchedRepr::Static(template))
    }

    /// The template text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            MatchedRepr::Static(s) => s,
            MatchedRepr::Shared(s) => s,
        }
    }
}

impl fmt::Debug for MatchedRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MatchedRoute").field(&self.as_str()).finish()
    }
}

impl fmt::Display for MatchedRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for MatchedRoute {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for MatchedRoute {}

impl std::hash::Hash for MatchedRoute {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl AsRef<str> for MatchedRoute {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for MatchedRoute {
    fn from(template: &'static str) -> Self {
        Self::from_static(template)
    }
}

impl From<Arc<str>> for MatchedRoute {
    fn from(template: Arc<str>) -> Self {
        Self(MatchedRepr::Shared(template))
    }
}

impl From<String> for MatchedRoute {
    fn from(template: String) -> Self {
        Self(MatchedRepr::Shared(template.into()))
    }
}

/// A request method, folded into a bounded set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MethodClass {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Other,
}

impl MethodClass {
    pub(crate) const ALL: [MethodClass; 8] = [
        MethodClass::Get,
        MethodClass::Head,
        MethodClass::Post,
        MethodClass::Put,
        MethodClass::Patch,
        MethodClass::Delete,
        MethodClass::Options,
        MethodClass::Other,
    ];

    #[inline]
    pub(crate) fn of(method: &http::Method) -> Self {
        match *method {
            http::Method::GET => MethodClass::Get,
            http::Method::HEAD => MethodClass::Head,
            http::Method::POST => MethodClass::Post,
            http::Method::PUT => MethodClass::Put,
            http::Method::PATCH => MethodClass::Patch,
            http::Method::DELETE => MethodClass::Delete,
            http::Method::OPTIONS => MethodClass::Options,
            _ => MethodClass::Other,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MethodClass::Get => "GET",
            MethodClass::Head => "HEAD",
            MethodClass::Post => "POST",
            MethodClass::Put => "PUT",
            MethodClass::Patch => "PATCH",
            MethodClass::Delete => "DELETE",
            MethodClass::Options => "OPTIONS",
            MethodClass::Other => "OTHER",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_literals_and_one_segment_parameters() {
        let t =
            RouteTable::new(["/health", "/api/users/{id}", "/api/users/{id}/links", "/"]).unwrap();
        assert_eq!(t.match_path("/health"), 0);
        assert_eq!(t.match_path("/api/users/42"), 1);
        assert_eq!(t.match_path("/api/users/42/links"), 2);
        assert_eq!(t.match_path("/"), 3);
        for unmatched in [
            "/health/",
            "/api/users/",
            "/api/users",
            "/api/users/1/2",
            "health",
            "",
            "/nope",
        ] {
            assert_eq!(t.match_path(unmatched), t.len(), "{unmatched:?}");
        }
        assert_eq!(t.template(t.len()), UNMATCHED);
    }

    #[test]
    fn templates_are_found_by_their_exact_text() {
        let t = RouteTable::new(["/health", "/api/users/{id}", "/"]).unwrap();
        assert_eq!(t.id_of("/health"), 0);
        assert_eq!(t.id_of("/api/users/{id}"), 1);
        assert_eq!(t.id_of("/"), 2);
        for unknown in [
            "/api/users/42",
            "/api/users/{user}",
            "/health/",
            "",
            "unmatched",
        ] {
            assert_eq!(t.id_of(unknown), t.len(), "{unknown:?}");
        }
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in ["health", "/a/{b", "/a/x{b}", "/dup", ""] {
            let list: Vec<&str> = if bad == "/dup" {
                vec!["/dup", "/dup"]
            } else {
                vec![bad]
            };
            assert!(RouteTable::new(list).is_err(), "{bad:?}");
        }
    }
}
