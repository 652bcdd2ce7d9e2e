"""ShiftAddLLM: linear layers reparameterized as sign planes times additive powers of two
(`reparameterize.ShiftAdd`), the quantizers (`quantize`: binary coding with output-error
compensation, and the round-to-nearest baseline) and the linear-layer finder (`sites`)."""

from compiler.passes.shift_add.quantize import QuantizedLinear, RoundToNearest, rtn_quantize, shift_add_quantize
from compiler.passes.shift_add.reparameterize import ShiftAdd, allocate
from compiler.passes.shift_add.sites import LinearSite, linear_sites

__all__ = ["LinearSite", "QuantizedLinear", "RoundToNearest", "ShiftAdd", "allocate", "linear_sites", "rtn_quantize", "shift_add_quantize"]
