"""A test-only app: a custom user model without an ``is_active`` field."""
