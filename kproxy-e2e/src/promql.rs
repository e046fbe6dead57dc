//! The metric names a PromQL expression reads, so that a dashboard's queries can be checked
//! against what a live agent serves. Not a PromQL parser: it skips what cannot be a metric name
//! (strings, label matchers, ranges, numbers, functions, aggregation operators and keywords, the
//! label lists of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`, Grafana's `$variables`)
//! and returns every other identifier.

use std::collections::BTreeSet;

/// PromQL's aggregation operators and keywords: identifiers that are never a metric name.
const KEYWORDS: &[&str] = &[
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "atan2", "inf", "nan",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names `expr` reads.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_quoted(&chars, i),
            '{' => i = skip_until(&chars, i, '}'),
            '[' => i = skip_until(&chars, i, ']'),
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_until(&chars, i, '}');
                } else {
                    while i < chars.len() && is_ident(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                // A number, a duration (`5m`) or a float with an exponent: all one token.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let is_call = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) {
                    // `by (le)`: the list holds label names, not expressions.
                    if is_call {
                        i = skip_until(&chars, next, ')');
                    }
                } else if !is_call && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The metric names a Grafana templating query reads: `label_values(METRIC_SELECTOR, label)`,
/// `query_result(EXPR)`, or a plain expression.
pub fn templating_metric_names(query: &str) -> BTreeSet<String> {
    let q = query.trim();
    if let Some(args) = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
        // The last comma outside braces separates the selector from the label.
        let mut depth = 0i32;
        let mut split = None;
        for (n, c) in args.char_indices() {
            match c {
                '{' | '(' => depth += 1,
                '}' | ')' => depth -= 1,
                ',' if depth == 0 => split = Some(n),
                _ => {}
            }
        }
        return match split {
            Some(n) => metric_names(&args[..n]),
            None => BTreeSet::new(), // `label_values(label)`: no metric named.
        };
    }
    if let Some(expr) = q.strip_prefix("query_result(").and_then(|r| r.strip_suffix(')')) {
        return metric_names(expr);
    }
    metric_names(q)
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The index after the quoted string starting at `start` (backslash escapes honoured).
fn skip_quoted(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The index after the `close` matching the opener at `start`, skipping quoted strings.
fn skip_until(chars: &[char], start: usize, close: char) -> usize {
    let open = chars[start];
    let mut depth = 0;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_quoted(chars, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).into_iter().collect()
    }

    #[test]
    fn a_histogram_quantile_names_its_bucket_series_only() {
        assert_eq!(
            names(r#"histogram_quantile(0.99, sum by (instance, le) (rate(kubeproxy_sync_proxy_rules_duration_seconds_bucket{job="kproxy", instance=~"$instance"}[$__rate_interval])))"#),
            ["kubeproxy_sync_proxy_rules_duration_seconds_bucket"]
        );
    }

    #[test]
    fn binary_operations_name_both_sides_and_skip_matching_labels() {
        assert_eq!(
            names("kproxy_bpf_map_entries / on (instance, map) group_left kproxy_bpf_map_capacity > 0.8"),
            ["kproxy_bpf_map_capacity", "kproxy_bpf_map_entries"]
        );
        assert_eq!(names("time() - kubeproxy_sync_proxy_rules_last_timestamp_seconds"), ["kubeproxy_sync_proxy_rules_last_timestamp_seconds"]);
        assert_eq!(names("sum without (pod) (increase(a_total[1h])) or vector(0)"), ["a_total"]);
    }

    #[test]
    fn strings_numbers_durations_and_variables_are_not_names() {
        assert_eq!(names(r#"topk(5, x{reason!~"no_backend|source range"}) offset 5m * 1e3 + 0.5"#), ["x"]);
        assert_eq!(names("rate(y[${__range}]) * $scale"), ["y"]);
        assert!(names("vector(1)").is_empty());
    }

    #[test]
    fn templating_label_values_names_the_selector_metric() {
        assert_eq!(
            templating_metric_names(r#"label_values(kubeproxy_sync_proxy_rules_duration_seconds_count{job="kproxy"}, instance)"#).into_iter().collect::<Vec<_>>(),
            ["kubeproxy_sync_proxy_rules_duration_seconds_count"]
        );
        assert!(templating_metric_names("label_values(instance)").is_empty());
        assert_eq!(templating_metric_names("query_result(up)").into_iter().collect::<Vec<_>>(), ["up"]);
    }
}
