"""Layer skipping: static removal of attention/MLP sublayers or blocks (`LayerSkip`), and
SkipDecode-style dynamic exits during decode (`compiler.passes.layer_skip.dynamic`)."""

from compiler.passes.layer_skip.static import KINDS, METHODS, LayerSkip, apply_skips

__all__ = ["KINDS", "METHODS", "LayerSkip", "apply_skips"]
