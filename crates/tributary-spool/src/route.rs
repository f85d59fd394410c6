//! [`Route`]: which upstream a stored payload goes to.

use std::fmt;

use tributary::Region;

/// Which upstream a stored payload must reach. EU traffic is kept apart from US traffic from
/// the moment it arrives: the route is stored with the payload, merging never crosses it, and
/// a payload is never sent to an upstream its route does not name.
///
/// The route is text only where it is stored (an SQLite column, an SQS message attribute):
/// `us` and `eu`. A value this version does not know, written by a newer one that shares the
/// spool, is kept as [`Route::Unknown`] and never guessed into a region.
///
/// ```
/// use tributary::Region;
/// use tributary_spool::Route;
/// assert_eq!(Route::from("eu"), Route::Region(Region::Eu));
/// assert_eq!(Route::from(Region::Us).as_str(), "us");
/// assert_eq!(Route::from("apac").region(), None);
/// assert_eq!(Route::from("apac").as_str(), "apac");
/// ```
#[derive(Debug, Clone)]
pub enum Route {
    /// One of the Event API's regions.
    Region(Region),
    /// A route written by a newer version of Tributary; kept as written.
    Unknown(Box<str>),
}

impl Route {
    /// The US Event API.
    pub const US: Route = Route::Region(Region::Us);
    /// The EU Event API.
    pub const EU: Route = Route::Region(Region::Eu);

    /// The stored form: `us`, `eu`, or the unknown value as written.
    pub fn as_str(&self) -> &str {
        match self {
            Route::Region(Region::Us) => "us",
            Route::Region(Region::Eu) => "eu",
            Route::Unknown(s) => s,
        }
    }

    /// The region, if this version knows the route.
    /// Read from the stored form, so that a hand-made `Unknown("eu")` is the EU route, as it
    /// becomes on its way through storage.
    pub fn region(&self) -> Option<Region> {
        match self {
            Route::Region(r) => Some(*r),
            Route::Unknown(s) => stored_region(s),
        }
    }
}

impl Default for Route {
    fn default() -> Self {
        Route::US
    }
}

impl From<Region> for Route {
    fn from(r: Region) -> Self {
        Route::Region(r)
    }
}

/// Reads the stored form. Only the exact lowercase names are regions: the spool writes
/// nothing else, so anything else is a newer version's route.
impl From<&str> for Route {
    fn from(s: &str) -> Self {
        stored_region(s).map_or_else(|| Route::Unknown(s.into()), Route::Region)
    }
}

/// The region a stored route names: only the exact forms the spool writes.
fn stored_region(s: &str) -> Option<Region> {
    match s {
        "us" => Some(Region::Us),
        "eu" => Some(Region::Eu),
        _ => None,
    }
}

impl From<String> for Route {
    fn from(s: String) -> Self {
        Route::from(s.as_str())
    }
}

impl PartialEq<&str> for Route {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Routes are equal when their stored forms are: `Route::Unknown("us".into())` (which only
/// hand-written code can make) is the US route, as it becomes on its way through storage.
impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

/// By stored form, so that routes sort the same on every version.
impl Ord for Route {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for Route {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The SQLite edge: the route is a `TEXT` column.
#[cfg(feature = "sqlite")]
mod sql {
    use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

    use super::Route;

    impl ToSql for Route {
        fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
            Ok(ToSqlOutput::from(self.as_str()))
        }
    }

    impl FromSql for Route {
        fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
            value.as_str().map(Route::from)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips() {
        for r in [Route::US, Route::EU, Route::Unknown("apac".into())] {
            assert_eq!(Route::from(r.as_str()), r);
        }
        // Only the forms the spool writes are regions.
        assert_eq!(Route::from("EU"), Route::Unknown("EU".into()));
        assert_eq!(Route::from("EU").region(), None);
        // A hand-made Unknown holding a stored region name is that region, as storage makes it.
        assert_eq!(Route::Unknown("us".into()), Route::US);
        assert_eq!(Route::Unknown("eu".into()).region(), Some(Region::Eu));
    }
}
