"""Compiler ops: custom torch.library ops that passes insert and backends lower."""

from compiler.ops.registry import Kernel, LoweringRequest, CompilerOp, compiler_op, compiler_ops, op_for_target
from compiler.ops.causal_attention import causal_attention
from compiler.ops.rms_norm import rms_norm

__all__ = [
    "CompilerOp",
    "causal_attention",
    "Kernel",
    "LoweringRequest",
    "compiler_op",
    "compiler_ops",
    "op_for_target",
    "rms_norm",
]
