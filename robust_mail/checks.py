"""System checks (placeholder until conf.py lands)."""

from __future__ import annotations
