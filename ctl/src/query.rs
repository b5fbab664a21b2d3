//! Label queries for `nodes ls --query`: `env=prod,site!=lab` keeps the nodes whose `env` is
//! `prod` and whose `site` is anything but `lab` (a node without a `site` label included, as a
//! Kubernetes selector has it).

use tunnel_proto::api::Labels;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Is(String, String),
    IsNot(String, String),
}

/// Every term must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(Vec<Term>);

impl Query {
    /// Parses `k=v` and `k!=v` terms, comma-separated. `Err`: one sentence saying which term is
    /// wrong.
    pub fn parse(text: &str) -> Result<Query, String> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim) {
            if term.is_empty() {
                return Err(format!("{text:?} has an empty term"));
            }
            let (key, value, negated) = match term.split_once("!=") {
                Some((k, v)) => (k, v, true),
                None => match term.split_once('=') {
                    Some((k, v)) => (k, v, false),
                    None => {
                        return Err(format!(
                            "{term:?} is not KEY=VALUE or KEY!=VALUE (e.g. env=prod,site!=lab)"
                        ));
                    }
                },
            };
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() || value.contains('=') {
                return Err(format!(
                    "{term:?} is not KEY=VALUE or KEY!=VALUE (e.g. env=prod,site!=lab)"
                ));
            }
            terms.push(if negated {
                Term::IsNot(key.into(), value.into())
            } else {
                Term::Is(key.into(), value.into())
            });
        }
        Ok(Query(terms))
    }

    /// The query `--labels k=v,...` stands for: every label equal.
    pub fn all_of(labels: &Labels) -> Query {
        Query(
            labels
                .iter()
                .map(|(k, v)| Term::Is(k.clone(), v.clone()))
                .collect(),
        )
    }

    /// Both queries at once.
    pub fn and(mut self, other: Query) -> Query {
        self.0.extend(other.0);
        self
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|term| match term {
            Term::Is(k, v) => labels.get(k) == Some(v),
            Term::IsNot(k, v) => labels.get(k) != Some(v),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equal_and_not_equal_terms_all_hold() {
        let q = Query::parse("env=prod, site!=lab").unwrap();
        assert!(q.matches(&labels(&[("env", "prod"), ("site", "paris")])));
        assert!(q.matches(&labels(&[("env", "prod")])));
        assert!(!q.matches(&labels(&[("env", "prod"), ("site", "lab")])));
        assert!(!q.matches(&labels(&[("env", "dev")])));
        assert!(!q.matches(&labels(&[])));
    }

    #[test]
    fn malformed_terms_are_named() {
        for bad in ["", "env", "env=prod,", "=x", "!=x", "a=b=c", "a!=b=c"] {
            let e = Query::parse(bad).unwrap_err();
            assert!(e.contains('"'), "{bad}: {e}");
        }
    }

    #[test]
    fn labels_flag_and_query_combine() {
        let q = Query::all_of(&labels(&[("env", "prod")])).and(Query::parse("site!=lab").unwrap());
        assert!(q.matches(&labels(&[("env", "prod"), ("site", "x")])));
        assert!(!q.matches(&labels(&[("env", "prod"), ("site", "lab")])));
    }
}
