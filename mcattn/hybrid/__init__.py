"""Hybrid sparse + low-rank attention (issue 26)."""
