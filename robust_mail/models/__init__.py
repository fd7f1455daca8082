"""Models of robust_mail. One module per model family, re-exported here for Django."""

from __future__ import annotations
