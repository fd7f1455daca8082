"""Benchmarks of robust_mail against Django's stock SMTP backend; ``python -m benchmarks``.

Not part of the test suite: nothing here asserts a time. ``make bench`` runs everything and
rewrites ``docs/performance.md`` and ``docs/performance.png``.
"""
