//! Topic templates such as `outbox.event.{aggregate_type}` or `shop.{event_type}`.
//!
//! A placeholder names a role (`{aggregate_type}`, `{event_type}`, `{aggregate_id}`, `{id}`,
//! and Debezium's spellings `{aggregatetype}`, `{type}`), which stands for whatever column
//! the mapping gives that role, or any other column of the row (`{tenant}`). Which columns
//! exist is only known per table, so the template is resolved against each table's layout
//! when its Relation message arrives ([`super::Mapper::relation`]).

use super::columns::Role;

/// A topic template that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic template {template:?}: {reason}")]
pub struct TemplateError {
    pub template: String,
    pub reason: String,
}

/// One piece of a template: literal text or a placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// The column the mapping gives this role.
    Role(Role),
    /// A column named in the template.
    Column(String),
}

#[derive(Debug, Clone)]
pub struct TopicTemplate {
    text: String,
    segments: Vec<Segment>,
}

impl TopicTemplate {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let error = |reason: String| TemplateError {
            template: template.to_owned(),
            reason,
        };
        let mut segments = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                segments.push(Segment::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| error("a '{' is never closed".into()))?;
            let name = &rest[open + 1..open + close];
            if name.is_empty() || name.contains('{') {
                return Err(error(
                    "a placeholder must name a column: {event_type}, {tenant}, ...".into(),
                ));
            }
            segments.push(match Role::from_placeholder(name) {
                Some(role) => Segment::Role(role),
                None => Segment::Column(name.to_owned()),
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(error("a '}' has no opening '{'".into()));
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.to_owned()));
        }
        if segments.is_empty() {
            return Err(error("the template is empty".into()));
        }
        Ok(TopicTemplate {
            text: template.to_owned(),
            segments,
        })
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The topic for one event: `value` gives each placeholder's text, or why it has none.
    pub fn render<'a>(&self, mut value: impl FnMut(&Segment) -> Result<&'a str, String>) -> Result<String, String> {
        let mut topic = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => topic.push_str(text),
                placeholder => topic.push_str(value(placeholder)?),
            }
        }
        validate_topic_name(&topic)?;
        Ok(topic)
    }
}

/// Kafka's own rule: 1 to 249 characters of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(topic: &str) -> Result<(), String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.is_empty() || topic.len() > 249 || topic == "." || topic == ".." || !topic.chars().all(legal) {
        return Err(format!(
            "topic name {topic:?} is not legal in Kafka (1-249 characters of a-z A-Z 0-9 . _ -)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_name_roles_or_columns() {
        let template = TopicTemplate::parse("shop.{event_type}.{tenant}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            template.segments(),
            [
                Segment::Literal("shop.".into()),
                Segment::Role(Role::EventType),
                Segment::Literal(".".into()),
                Segment::Column("tenant".into()),
            ]
        );
        let debezium = TopicTemplate::parse("outbox.event.{aggregatetype}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(debezium.segments()[1], Segment::Role(Role::AggregateType));
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in ["x.{aggregate_type", "x}", "", "x.{}", "{a{b}"] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rendering_checks_kafka_names() {
        let template = TopicTemplate::parse("a.{tenant}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(template.render(|_| Ok("acme")), Ok("a.acme".to_owned()));
        assert!(template.render(|_| Ok("no spaces")).is_err());
        assert!(template.render(|_| Err("NULL".into())).is_err());
    }
}
