"""Analyses of the IR: read-only questions about a graph that passes and reports share."""

from compiler.analysis.attention import AttentionSite, find_attention, replace_site, summary

__all__ = ["AttentionSite", "find_attention", "replace_site", "summary"]
