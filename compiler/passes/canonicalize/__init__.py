"""Canonicalization passes: lossless rewrites that undo what capture made awkward."""
