"""The Hub model cards: the template the library renders, and one card per released variant (package data)."""
