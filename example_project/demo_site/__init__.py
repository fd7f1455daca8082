"""The example site: sign-in by code, a send form, a live dashboard and the local mailboxes."""

from __future__ import annotations
