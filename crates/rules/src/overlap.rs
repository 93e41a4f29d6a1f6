//! Can two templates of different shapes produce the same key?
//!
//! Each template is a regular language over characters: its literal characters, and for each
//! placeholder the language of encoded values `(unreserved | %HH)*`. Literal text never contains
//! `%`, so any `%HH` group inside a common key is consumed by a placeholder on both sides and can
//! be replaced by one unreserved character without leaving the intersection. It is therefore
//! enough to model a placeholder as `unreserved*`. The check walks the product automaton with a
//! 0-1 BFS and returns the shortest common key, which is a real witness: every placeholder part
//! is unreserved text, i.e. the canonical encoding of itself.

use std::collections::VecDeque;

use crate::escape::is_unreserved;
use crate::template::Token;

/// The shortest key both token sequences can produce, or `None` if their languages are disjoint.
pub(crate) fn witness(a: &[Token], b: &[Token]) -> Option<String> {
    let width = b.len() + 1;
    let nodes = (a.len() + 1) * width;
    let target = nodes - 1;
    let mut dist = vec![usize::MAX; nodes];
    // Predecessor of each node and the character consumed on the way (None for an epsilon step).
    let mut prev: Vec<Option<(usize, Option<char>)>> = vec![None; nodes];
    let mut queue = VecDeque::new();
    dist[0] = 0;
    queue.push_back(0usize);
    while let Some(node) = queue.pop_front() {
        if node == target {
            break;
        }
        let (i, j) = (node / width, node % width);
        let mut relax = |next: usize, c: Option<char>, queue: &mut VecDeque<usize>| {
            let d = dist[node] + usize::from(c.is_some());
            if d < dist[next] {
                dist[next] = d;
                prev[next] = Some((node, c));
                if c.is_some() {
                    queue.push_back(next);
                } else {
                    queue.push_front(next);
                }
            }
        };
        let ta = a.get(i).copied();
        let tb = b.get(j).copied();
        // A placeholder may end here (epsilon), on either side.
        if ta == Some(Token::Value) {
            relax(node + width, None, &mut queue);
        }
        if tb == Some(Token::Value) {
            relax(node + 1, None, &mut queue);
        }
        match (ta, tb) {
            (Some(Token::Literal(x)), Some(Token::Literal(y))) if x == y => {
                relax(node + width + 1, Some(x), &mut queue);
            }
            (Some(Token::Literal(x)), Some(Token::Value)) if is_unreserved(x) => {
                relax(node + width, Some(x), &mut queue);
            }
            (Some(Token::Value), Some(Token::Literal(y))) if is_unreserved(y) => {
                relax(node + 1, Some(y), &mut queue);
            }
            // Both inside placeholders: consuming a character loops in place, never needed.
            _ => {}
        }
    }
    if dist[target] == usize::MAX {
        return None;
    }
    let mut chars = Vec::new();
    let mut node = target;
    while let Some((from, c)) = prev[node] {
        chars.extend(c);
        node = from;
    }
    chars.reverse();
    Some(chars.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Template;

    fn w(a: &str, b: &str) -> Option<String> {
        let ta = Template::parse(a).unwrap();
        let tb = Template::parse(b).unwrap();
        let found = witness(&ta.tokens(), &tb.tokens());
        if let Some(key) = &found {
            assert!(ta.decode_key(key).is_some(), "{a} cannot produce {key}");
            assert!(tb.decode_key(key).is_some(), "{b} cannot produce {key}");
        }
        assert_eq!(
            found.is_some(),
            witness(&tb.tokens(), &ta.tokens()).is_some()
        );
        found
    }

    #[test]
    fn finds_overlaps_and_proves_disjointness() {
        assert_eq!(w("x{id}", "xy{id}").as_deref(), Some("xy"));
        assert_eq!(
            w("item-{id}", "item-{id}-detail").as_deref(),
            Some("item--detail")
        );
        assert_eq!(w("p{id}", "products").as_deref(), Some("products"));
        assert_eq!(w("p:{a}:x", "p:{a}").as_deref(), None);
        assert_eq!(w("product:{id}", "product:{id}:reviews"), None);
        assert_eq!(w("product:{id}", "products:all"), None);
        assert_eq!(w("category:{c}:products", "category:{id}"), None);
        assert_eq!(w("a:{x}:b", "a:{x}:{y}").as_deref(), Some("a::b"));
        assert_eq!(w("u:{a}/{b}", "u:{a}/x/{b}"), None);
        assert_eq!(w("u:{a}/{b}", "u:{a}/x{b}").as_deref(), Some("u:/x"));
    }
}
