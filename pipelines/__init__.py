"""Stages and entry points that run `swd_core` on Ray (the only package that imports Ray)."""
