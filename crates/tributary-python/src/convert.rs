//! The SDK's `ImpressionEvent` / `ConversionEvent` objects to [`tributary::UserEvent`]s,
//! reading the same attributes the SDK's `EventFactory._create_visitor` reads.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};
use tributary::{
    AttributeValue, CompactString, Conversion, EventContext, Impression, Region, UserEvent,
    UserEventKind, VisitorAttribute,
};

/// Why a user event could not be converted (it is counted as invalid and logged).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConvertError {
    /// A Python attribute was missing or of the wrong type.
    #[error("{0}")]
    Python(#[from] PyErr),
    /// A field held something the Event API cannot carry.
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
}

/// The SDK's classes and helpers (from `tributary_events._sdk`), looked up once.
pub(crate) struct Sdk {
    pub(crate) impression: Py<PyAny>,
    pub(crate) conversion: Py<PyAny>,
    experiment: Py<PyAny>,
    variation: Py<PyAny>,
    tags_json: Py<PyAny>,
    revenue_and_value: Py<PyAny>,
    pub(crate) make_log_event: Py<PyAny>,
    pub(crate) log_event_type: Py<PyAny>,
}

impl Sdk {
    pub(crate) fn load(py: Python<'_>) -> PyResult<Sdk> {
        let m = py.import("tributary_events._sdk")?;
        let get = |name: &str| m.getattr(name).map(Bound::unbind);
        Ok(Sdk {
            impression: get("ImpressionEvent")?,
            conversion: get("ConversionEvent")?,
            experiment: get("Experiment")?,
            variation: get("Variation")?,
            tags_json: get("tags_json")?,
            revenue_and_value: get("revenue_and_value")?,
            make_log_event: get("make_log_event")?,
            log_event_type: get("LOG_EVENT")?,
        })
    }
}

/// Converts on the converter thread, keeping the last context so that a run of events of
/// one datafile shares one `Arc<EventContext>` (the batcher then compares pointers).
pub(crate) struct Converter {
    sdk: Arc<Sdk>,
    logger: Py<PyAny>,
    last_context: Option<Arc<EventContext>>,
}

impl Converter {
    pub(crate) fn new(sdk: Arc<Sdk>, logger: Py<PyAny>) -> Self {
        Converter {
            sdk,
            logger,
            last_context: None,
        }
    }

    /// One user event. `event` passed the type check of `process()`.
    pub(crate) fn convert(&mut self, event: &Bound<'_, PyAny>) -> Result<UserEvent, ConvertError> {
        let py = event.py();
        let context = self.context(&event.getattr("event_context")?)?;
        let user_id = string(&event.getattr("user_id")?, "user_id")?;
        let uuid = string(&event.getattr("uuid")?, "uuid")?;
        let timestamp: u64 = event
            .getattr("timestamp")?
            .extract()
            .map_err(|_| field("timestamp", "not a non-negative integer"))?;
        let attributes = attributes(&event.getattr("visitor_attributes")?)?;
        let kind = if event.is_instance(self.sdk.impression.bind(py))? {
            UserEventKind::Impression(self.impression(event)?)
        } else {
            UserEventKind::Conversion(self.conversion(event)?)
        };
        Ok(UserEvent {
            context,
            user_id,
            attributes,
            uuid,
            timestamp,
            kind,
        })
    }

    fn context(&mut self, ctx: &Bound<'_, PyAny>) -> Result<Arc<EventContext>, ConvertError> {
        let region: String = match ctx.getattr("region")? {
            r if r.is_none() => String::new(),
            r => r.str()?.to_string(),
        };
        let context = EventContext {
            account_id: string(&ctx.getattr("account_id")?, "event_context.account_id")?,
            project_id: string(&ctx.getattr("project_id")?, "event_context.project_id")?,
            revision: string(&ctx.getattr("revision")?, "event_context.revision")?,
            client_name: string(&ctx.getattr("client_name")?, "event_context.client_name")?,
            client_version: string(
                &ctx.getattr("client_version")?,
                "event_context.client_version",
            )?,
            anonymize_ip: ctx.getattr("anonymize_ip")?.is_truthy()?,
            // The SDK's visitor_attributes already carry `$opt_bot_filtering`.
            bot_filtering: None,
            // As the SDK's EventFactory: EU goes to the EU endpoint, anything else to the US one.
            region: if region.eq_ignore_ascii_case("EU") {
                Region::Eu
            } else {
                Region::Us
            },
        };
        match &self.last_context {
            Some(last) if **last == context => Ok(last.clone()),
            _ => {
                let context = Arc::new(context);
                self.last_context = Some(context.clone());
                Ok(context)
            }
        }
    }

    fn impression(&self, event: &Bound<'_, PyAny>) -> Result<Impression, ConvertError> {
        let py = event.py();
        let (mut variation_id, mut variation_key) =
            (CompactString::default(), CompactString::default());
        let variation = event.getattr("variation")?;
        if variation.is_instance(self.sdk.variation.bind(py))? {
            variation_id = loose_string(&variation.getattr("id")?);
            variation_key = loose_string(&variation.getattr("key")?);
        } else if let Ok(dict) = variation.cast::<PyDict>() {
            variation_id = dict
                .get_item("id")?
                .map(|v| loose_string(&v))
                .unwrap_or_default();
            variation_key = dict
                .get_item("key")?
                .map(|v| loose_string(&v))
                .unwrap_or_default();
        }
        let (mut campaign_id, mut experiment_id) =
            (CompactString::default(), CompactString::default());
        let experiment = event.getattr("experiment")?;
        if experiment.is_truthy()? {
            experiment_id = loose_string(&experiment.getattr("id")?);
            if experiment.is_instance(self.sdk.experiment.bind(py))? {
                campaign_id = loose_string(&experiment.getattr("layerId")?);
            }
        }
        let cmab_uuid = match event.getattr("cmab_uuid")? {
            c if c.is_truthy()? => Some(CompactString::from(&*c.str()?.to_string_lossy())),
            _ => None,
        };
        Ok(Impression {
            campaign_id,
            experiment_id,
            variation_id,
            variation_key,
            flag_key: loose_string(&event.getattr("flag_key")?),
            rule_key: loose_string(&event.getattr("rule_key")?),
            rule_type: loose_string(&event.getattr("rule_type")?),
            enabled: event.getattr("enabled")?.is_truthy()?,
            cmab_uuid,
        })
    }

    fn conversion(&self, event: &Bound<'_, PyAny>) -> Result<Conversion, ConvertError> {
        let py = event.py();
        let ev = event.getattr("event")?;
        if !ev.is_truthy()? {
            // The SDK's EventFactory logs "Invalid user event." and sends nothing for it.
            return Err(field("event", "a ConversionEvent without an event"));
        }
        let tags = event.getattr("event_tags")?;
        let (revenue, value, tags) = if tags.is_none() {
            (None, None, None)
        } else {
            let rv = self
                .sdk
                .revenue_and_value
                .bind(py)
                .call1((&tags, self.logger.bind(py)))?;
            let revenue: Option<i64> = rv
                .get_item(0)?
                .extract()
                .map_err(|_| field("event_tags.revenue", "an integer beyond 64 bits"))?;
            let value: Option<f64> = rv
                .get_item(1)?
                .extract()
                .map_err(|_| field("event_tags.value", "not a number"))?;
            let json: String = self.sdk.tags_json.bind(py).call1((&tags,))?.extract()?;
            let map = match serde_json::from_str::<serde_json::Value>(&json) {
                Ok(serde_json::Value::Object(map)) => map,
                Ok(_) => return Err(field("event_tags", "not a dict")),
                Err(e) => {
                    return Err(field(
                        "event_tags",
                        format!("not JSON the Event API accepts ({e})"),
                    ));
                }
            };
            (revenue, value, Some(map))
        };
        Ok(Conversion {
            event_id: loose_string(&ev.getattr("id")?),
            event_key: loose_string(&ev.getattr("key")?),
            revenue,
            value,
            tags,
        })
    }
}

fn field(field: &'static str, reason: impl Into<String>) -> ConvertError {
    ConvertError::Field {
        field,
        reason: reason.into(),
    }
}

/// A `str` field, as a `String` (the context's) or a `CompactString` (the event's), copied
/// once from the Python string.
fn string<T: for<'a> From<&'a str>>(
    v: &Bound<'_, PyAny>,
    name: &'static str,
) -> Result<T, ConvertError> {
    match v.cast::<PyString>() {
        Ok(s) => Ok(T::from(&*s.to_cow()?)),
        Err(_) => Err(field(name, format!("expected a str, got {}", type_name(v)))),
    }
}

/// A string field the SDK copies as it is; `None` becomes empty (the SDK's defaults).
fn loose_string(v: &Bound<'_, PyAny>) -> CompactString {
    if v.is_none() {
        return CompactString::default();
    }
    // `to_string_lossy` is what `to_string` (Display) wrote, without a `String` in between.
    match v.cast::<PyString>() {
        Ok(s) => CompactString::from(&*s.to_string_lossy()),
        Err(_) => v
            .str()
            .map(|s| CompactString::from(&*s.to_string_lossy()))
            .unwrap_or_default(),
    }
}

fn attributes(list: &Bound<'_, PyAny>) -> Result<Vec<VisitorAttribute>, ConvertError> {
    if list.is_none() {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(list.len().unwrap_or(0));
    for a in list.try_iter()? {
        let a = a?;
        let v = a.getattr("value")?;
        let value = if let Ok(b) = v.cast::<PyBool>() {
            AttributeValue::Bool(b.is_true())
        } else if v.cast::<PyInt>().is_ok() {
            AttributeValue::Int(
                v.extract()
                    .map_err(|_| field("visitor_attributes.value", "an integer beyond 64 bits"))?,
            )
        } else if let Ok(f) = v.cast::<PyFloat>() {
            AttributeValue::Float(f.value())
        } else if let Ok(s) = v.cast::<PyString>() {
            AttributeValue::String(CompactString::from(&*s.to_cow()?))
        } else {
            return Err(field(
                "visitor_attributes.value",
                format!("expected str, bool, int or float, got {}", type_name(&v)),
            ));
        };
        out.push(VisitorAttribute {
            entity_id: loose_string(&a.getattr("entity_id")?),
            key: loose_string(&a.getattr("key")?),
            kind: match a.getattr("type")? {
                t if t.is_none() => "custom".into(),
                t => loose_string(&t).into(),
            },
            value,
        });
    }
    Ok(out)
}

/// `module.QualName` of `v`'s type, for error messages.
pub(crate) fn type_name(v: &Bound<'_, PyAny>) -> String {
    let t = v.get_type();
    let name = t
        .qualname()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    match t.module() {
        Ok(m) if m != "builtins" => format!("{m}.{name}"),
        _ => name,
    }
}
